"""Typer command classes shared by the command line's sub-apps."""

import typer


class _NoBoolMetavar:
    """Typer's rich help prints ``<bool>`` after flags, which take no value: an empty metavar leaves it out."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for p in params:
            if getattr(p, "is_flag", False) and p.metavar is None:
                p.metavar = ""
        return params


class Command(_NoBoolMetavar, typer.core.TyperCommand):
    pass


class Group(_NoBoolMetavar, typer.core.TyperGroup):
    pass

"""Spec strings ``name(key=value, ...)`` shared by Python, the CLI and configs."""

from __future__ import annotations

import ast
import math

__all__ = ["parse_spec", "format_spec", "is_literal", "build"]

_FLOAT_NAMES = {"inf": math.inf, "nan": math.nan}


class _FloatNames(ast.NodeTransformer):
    """Turns the names ``inf`` and ``nan`` into float constants (``-inf`` is then a negated constant)."""

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if node.id in _FLOAT_NAMES:
            return ast.copy_location(ast.Constant(_FLOAT_NAMES[node.id]), node)
        return node


def parse_spec(spec: str) -> tuple[str, tuple, dict]:
    """Parse ``"name"`` or ``"name(1.5, key=value, ...)"`` into ``(name, args, kwargs)``.

    Values are Python literals (numbers, strings, booleans, None, tuples and lists of them) and the floats
    ``inf``, ``-inf`` and ``nan``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a spec must be a non-empty string like 'name(key=value)', got {spec!r}")
    try:
        node = ast.parse(spec.strip(), mode="eval").body
    except SyntaxError as e:
        raise ValueError(f"cannot parse spec {spec!r}: expected 'name(key=value, ...)'") from e
    if isinstance(node, ast.Name):
        return node.id, (), {}
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
        raise ValueError(f"cannot parse spec {spec!r}: expected 'name(key=value, ...)'")

    def value(v):
        try:
            return ast.literal_eval(_FloatNames().visit(v))
        except ValueError as e:
            raise ValueError(f"in spec {spec!r}: {ast.unparse(v)!r} is not a literal value") from e

    kwargs = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError(f"in spec {spec!r}: '**' is not allowed")
        if kw.arg in kwargs:
            raise ValueError(f"in spec {spec!r}: {kw.arg!r} is given twice")
        kwargs[kw.arg] = value(kw.value)
    return node.func.id, tuple(value(a) for a in node.args), kwargs


def is_literal(value) -> bool:
    """Whether ``value`` can be written in a spec string (and ``parse_spec`` reads it back equal, or nan)."""
    if value is None or type(value) in (bool, int, float, str):  # not subclasses: numpy's reprs do not parse
        return True
    if type(value) in (list, tuple):
        return all(map(is_literal, value))
    if type(value) is dict:
        return all(is_literal(k) and is_literal(v) for k, v in value.items())
    return False


def format_spec(name: str, options: dict) -> str:
    """``name(key=value, ...)``; a value that is not a literal is written ``<its name>``, which does not parse."""

    def fmt(v):
        if is_literal(v):
            return repr(v)
        name = getattr(v, "__name__", None) or type(v).__name__
        return name if name.startswith("<") else f"<{name}>"

    return f"{name}({', '.join(f'{k}={fmt(v)}' for k, v in options.items())})"


def build(spec: str, registry: dict, kind: str):
    """``registry[name](*args, **kwargs)`` for the spec string ``name(args, kwargs)``; an unknown name or bad options
    give a ValueError naming the ``kind`` and what is allowed."""
    name, args, kwargs = parse_spec(spec)
    if name not in registry:
        raise ValueError(f"unknown {kind} {name!r}; allowed: {', '.join(registry)}")
    try:
        return registry[name](*args, **kwargs)
    except TypeError as e:
        raise ValueError(f"bad options for {kind} {name!r}: {e}") from None

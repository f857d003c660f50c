"""Spec strings ``name(key=value, ...)`` shared by Python, the CLI and configs."""

from __future__ import annotations

import ast

__all__ = ["parse_spec", "format_spec"]


def parse_spec(spec: str) -> tuple[str, tuple, dict]:
    """Parse ``"name"`` or ``"name(1.5, key=value, ...)"`` into ``(name, args, kwargs)``.

    Values are Python literals (numbers, strings, booleans, None, tuples and lists of them).
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
            return ast.literal_eval(v)
        except ValueError as e:
            raise ValueError(f"in spec {spec!r}: {ast.unparse(v)!r} is not a literal value") from e

    kwargs = {}
    for kw in node.keywords:
        if kw.arg is None:
            raise ValueError(f"in spec {spec!r}: '**' is not allowed")
        kwargs[kw.arg] = value(kw.value)
    return node.func.id, tuple(value(a) for a in node.args), kwargs


def format_spec(name: str, **kwargs) -> str:
    inner = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"{name}({inner})" if inner else name

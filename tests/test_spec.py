"""Spec strings: parsing and writing them."""

import math

import pytest
import torch

from steer.spec import format_spec, parse_spec


def test_parse_spec_reads_inf_and_nan_as_floats():
    name, args, kwargs = parse_spec("f(inf, a=-inf, b=nan, c=(0.28, inf), d=[-inf, 1])")
    assert name == "f" and args == (math.inf,)
    assert kwargs["a"] == -math.inf and math.isnan(kwargs["b"])
    assert kwargs["c"] == (0.28, math.inf) and kwargs["d"] == [-math.inf, 1]
    with pytest.raises(ValueError, match="'infinity' is not a literal"):
        parse_spec("f(a=infinity)")


def test_parse_spec_rejects_an_option_given_twice():
    with pytest.raises(ValueError, match="in spec 'cfg\\(scale=3, scale=4\\)': 'scale' is given twice"):
        parse_spec("cfg(scale=3, scale=4)")


def test_format_spec_writes_what_parse_spec_reads():
    options = {"a": 3, "b": -math.inf, "c": (0.28, math.inf), "d": ["x", None], "e": True}
    text = format_spec("f", options)
    assert text == "f(a=3, b=-inf, c=(0.28, inf), d=['x', None], e=True)"
    assert parse_spec(text) == ("f", (), options)
    assert format_spec("f", {}) == "f()"

    def my_schedule(w, sigma):
        return w

    assert format_spec("f", {"a": torch.zeros(2), "b": my_schedule}) == "f(a=<Tensor>, b=<my_schedule>)"

"""Spec strings: parsing and writing them; every registered guidance method round-trips through
``parse(repr(g))``; bad options raise errors that name the method and the option."""

import math
import types

import pytest
import torch

import steer.guidance as g
from steer.guidance import REGISTRY, parse
from steer.models import hooks
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


# Non-default values for every option of every registered method. A method may need several cases where options
# exclude each other (fdg: scales or scale_low/scale_high/levels); the options of the guidance term (interval,
# schedule) are added by TERM_CASES.
CASES = {
    "cfg": [dict(scale=3)],
    "cfg_rescale": [dict(scale=5.0, phi=0.5, space="raw")],
    "apg": [dict(scale=8.0, eta=0.3, rescale=10.0, momentum=-0.25, space="eps")],
    "cfgpp": [dict(scale=0.8)],
    "cfg_zero_star": [dict(scale=3.0, zero_init_steps=2)],
    "adaptive": [dict(scale=4.0, threshold=0.95, test_space="eps", crossing="cond")],
    "tcfg": [dict(scale=5.0, space="v")],
    "tag": [dict(eta=1.2, eta_r=0.9), dict(scale=3.0, eta=1.1)],
    "fdg": [dict(scale_low=3.0, scale_high=8.0, levels=3, parallel_weight=0.5, space="raw", form="diffusers"),
            dict(scales=[9.0, 6.0, 2.0])],
    "characteristic": [dict(scale=3.0, reg=None, step=0.5, tol=1e-3, max_iter=20),
                       dict(reg=2.0, reg_range=2.0, anderson=False, reuse=0.5, reg_size=0.3, reg_w=0.4,
                            alpha_bar_min=0.01)],
    "dynamic_threshold": [dict(percentile=0.99, max_value=2.5)],
    "mambo": [dict(scale=6.0, alpha=4.0, space="raw")],
    "perp_neg": [dict(scale=5.0, neg_scale=0.5, space="eps")],
    "pag": [dict(scale=3.0, layers=["blocks.1.attn"])],
    "seg": [dict(scale=3.0, blur_sigma=2.0, layers="blocks.*.attn")],
    "tpg": [dict(scale=3.0, layers=["blocks.1"], seed=7)],
    "slg": [dict(scale=2.5, layers=["blocks.1", "blocks.2"])],
    "autoguidance": [dict(scale=1.8, guide="flow-weak")],
    "nag": [dict(scale=4.0, tau=2.0, alpha=0.25, norm="l2", layers=["*.attn2", 3], use_negative=True,
                 own_negative=True)],
    "nag_comfy": [dict(scale=4.0, tau=2.0, alpha=0.25, layers=["blocks.0.attn"], use_negative=True)],
    "sag": [dict(scale=1.5, blur_sigma=2.0, layers="blocks.1.attn", source="cond", kernel_size=31)],
    "classifier": [dict(scale=2.0, classifier="digits", label=3), dict(scale=3.0, classifier="digits",
                                                                      unconditional=True)],
    "dps": [dict(zeta=0.3, operator="downsample(2)", y=[[[[0.5]]]], clip=True)],
    "universal": [dict(forward_scale=2.0, backward_steps=2, recurrence=3, operator="inpaint(box=(0, 0, 2, 2))",
                       y=[[[[0.5, 0.1], [0.2, 0.3]]]], lr=0.01, cutoff=1e-4, clip=True)],
    "tfg": [dict(rho=2.0, mu=0.5, gamma=0.1, recurrence=2, iterations=4, operator="blur(sigma=2.0, size=3)",
                 y=[[[[0.5]]]], n_mc=2, schedule="constant", clip=False)],
    "flowchef": [dict(scale=50.0, operator="downsample(factor=4)", y=[[[[0.5]]]])],
}
TERM_CASES = [dict(sigma_lo=0.1, sigma_hi=5.0, schedule="clamp_linear", clamp=3.0, rule="step"),
              dict(when=(0.28, math.inf), schedule="cosine")]
NOT_IN_SPECS = {"modifier", "loss"}  # objects, not literals: see test_cfg_with_a_modifier_object (loss: a function)


def cases():
    for name, bases in CASES.items():
        for base in bases:
            yield name, base
            if name in REGISTRY and set(TERM_CASES[0]) <= set(REGISTRY[name].options) \
                    and not (name == "tag" and base.get("scale", 1.0) == 1.0):  # tag alone has no CFG term
                for extra in TERM_CASES:
                    yield name, {**base, **extra}


ALL_CASES = list(cases())


def test_every_method_and_option_has_a_case():
    assert set(CASES) == set(REGISTRY), "add cases for new methods to CASES"
    for name, info in REGISTRY.items():
        given = {k for n, kw in ALL_CASES if n == name for k in kw}
        missing = set(info.options) - given - NOT_IN_SPECS
        assert not missing, f"{name}: no case gives {sorted(missing)}"


def same(a, b, where="g"):
    """Assert that two objects have the same type and the same public state, recursively."""
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return
    assert type(a) is type(b), f"{where}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, torch.Generator):
        assert torch.equal(a.get_state(), b.get_state()), where
    elif isinstance(a, torch.nn.Module):
        same(a.state_dict(), b.state_dict(), f"{where}.state_dict()")
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: {sorted(a)} != {sorted(b)}"
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, types.FunctionType):
        assert a is b, where
    elif hasattr(a, "__dict__"):
        same({k: v for k, v in vars(a).items() if not k.startswith("_")},
             {k: v for k, v in vars(b).items() if not k.startswith("_")}, where)
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.mark.parametrize("name,kwargs", ALL_CASES, ids=[f"{n}-{i}" for i, (n, _) in enumerate(ALL_CASES)])
def test_spec_round_trip(name, kwargs):
    guide = getattr(g, name)(**kwargs)
    text = repr(guide)
    assert text.startswith(f"{name}("), text
    for k, v in kwargs.items():
        assert f"{k}={v!r}" in text, f"{k}={v!r} missing from {text}"
    again = parse(text)
    assert repr(again) == text
    same(guide, again)
    same(guide.options(), again.options(), "options()")


def test_defaults_print_as_an_empty_call_and_stacks_with_plus():
    assert repr(g.cfg(7.5)) == "cfg()" and repr(g.pag(scale=4)) == "pag()"
    text = "cfg(scale=3) + pag(scale=2.0, layers=['blocks.1.attn']) + dynamic_threshold(percentile=0.99)"
    assert repr(parse(text)) == text
    # a registered method that builds a stack stays one call inside a larger stack
    text = "cfg_rescale(phi=0.5) + pag(scale=2.0)"
    stack = parse(text)
    assert repr(stack) == text and len(stack.parts) == 3
    assert repr(g.tag(scale=3.0) + g.seg()) == "tag(scale=3.0) + seg()"


def test_inf_in_guidance_specs():
    assert parse("cfg(scale=3, sigma_lo=0.5, sigma_hi=inf)").sigma_hi == math.inf
    guide = parse("dynamic_threshold(max_value=inf, percentile=0.9)")
    assert guide.max_value == math.inf and repr(guide) == "dynamic_threshold(percentile=0.9)"
    assert repr(parse("cfg(when=(0.28, inf))")) == "cfg(when=(0.28, inf))"


def test_objects_built_from_classes_describe_all_their_options():
    objects = [
        g.CFG(3.0, g.APG(eta=0.2, momentum=-0.3), sigma_lo=0.5),
        g.CFG(5.0, g.TCFG("v")),
        g.CFG(10.0, g.MAMBO(4.0, space="raw"), schedule="linear"),
        g.CFGZeroStar(3.0, 2, when=(0.1, 2.0)),
        g.CFGPP(0.7, sigma_hi=2.0),
        g.Adaptive(3.0, 0.9, test_space="eps"),
        g.FDG(scales=[8.0, 4.0, 2.0], parallel_weight=0.5),
        g.Characteristic(3.0, reg=None, tol=1e-3, schedule="clamp_linear", clamp=2.5),
        g.PerpNeg(5.0, 0.5, space="eps"),
        g.TAG(1.1, 0.9),
        g.DynamicThreshold(0.99, 3.0),
        g.NAG(4.0, use_negative=True, layers=["blocks.0.attn"]),
        g.SAG(source="cond", blur_sigma=2.0),
        g.Perturbed("pag", hooks.IdentityAttention(["blocks.1.attn"]), 3.0),
        g.Perturbed("seg", hooks.SmoothedEnergy(None, 2.0), 3.0),
        g.Perturbed("tpg", hooks.TokenShuffle("blocks.1", seed=3), 3.0),
    ]
    for obj in objects:
        again = parse(repr(obj))
        same(obj, again, repr(obj))
    assert "test_space='eps'" in repr(objects[5]) and "use_negative=True" in repr(objects[11])
    assert repr(objects[7]).count("clamp=2.5") == 1 and "tol=0.001" in repr(objects[7])


def test_values_a_spec_cannot_hold():
    model = g.Autoguidance(guide="flow-weak").guide_model
    guide = g.autoguidance(scale=2.0, guide=model)
    assert repr(guide) == "autoguidance(scale=2.0, guide=<DigitsModel>)"
    with pytest.raises(ValueError, match="cannot parse spec"):
        parse(repr(guide))

    def my_schedule(w, sigma):
        return w

    assert repr(g.cfg(3, schedule=my_schedule)) == "cfg(scale=3.0, schedule=<my_schedule>)"


def test_cfg_with_a_modifier_object():
    guide = g.cfg(3.0, g.APG(eta=0.5))
    assert repr(guide) == "apg(scale=3.0, eta=0.5, rescale=15.0, momentum=-0.5, space='x0')"
    same(guide, parse(repr(guide)))


def test_term_options_at_their_defaults_are_not_passed_on():
    assert repr(parse("tag(eta=1.2, when=None, sigma_lo=0.0)")) == "tag(eta=1.2)"


WRONG_TYPE = [
    ("cfg(scale='a')", "cfg: scale must be a number, got 'a' (str)"),
    ("cfg(3, 4)", "cfg takes at most 1 positional argument (scale) in a spec, got 2"),
    ("fdg(3, 8)", "fdg takes at most 1 positional argument (scale_low) in a spec, got 2"),
    ("cfg(scal=3)", "cfg has no option 'scal' (did you mean 'scale'?); options: scale, modifier, sigma_lo"),
    ("cfg(sigma_lo=True)", "cfg: sigma_lo must be a number, got True (bool)"),
    ("characteristic(max_iter=2.5)", "characteristic: max_iter must be an integer, got 2.5 (float)"),
    ("characteristic(reg='none')", "characteristic: reg must be a number or None, got 'none' (str)"),
    ("nag(use_negative='yes')", "nag: use_negative must be True or False, got 'yes' (str)"),
    ("pag(layers=3.5)", "pag: layers must be a string, an integer, a list of values or None, got 3.5 (float)"),
    ("pag(layers=['a', 1.5])", "pag: layers must be a string, an integer, a list of values or None"),
    ("fdg(scales='big')", "fdg: scales must be a list of numbers or None, got 'big' (str)"),
    ("cfg(when=(1,))", "cfg: when must be a tuple of 2 numbers or None, got (1,) (tuple)"),
    ("cfg(schedule=3)", "cfg: schedule must be a string, a function or None, got 3 (int)"),
    ("adaptive(test_space=3)", "adaptive: test_space must be a string, got 3 (int)"),
    ("nope(scale=1)", "unknown guidance method 'nope'; allowed: adaptive, apg"),
]


def test_options_of_the_wrong_type_from_python():
    with pytest.raises(ValueError, match="cfg takes at most 8 positional arguments, got 9"):
        g.cfg(1, None, 0.0, 1.0, None, None, 2.0, "sigma", 8)
    with pytest.raises(ValueError, match="cfg: scale must be a number, got 'a' \\(str\\)"):
        g.CFG(scale="a")
    with pytest.raises(ValueError, match="pag: sigma_hi must be a number"):
        g.Perturbed("pag", hooks.IdentityAttention(None), 3.0, sigma_hi="high")


DO_NOT_FIT = [
    ("cfg(modifier='apg')", "cfg: modifier must be a modifier object such as steer.guidance.APG(...), got 'apg'; "
                            "in a spec string use apg(scale=..., ...) instead"),
    ("apg(space='pixels')", "apg: space must be one of 'raw', 'eps', 'x0', 'v', 'flow', 'score', got 'pixels'"),
    ("tcfg(space='x')", "tcfg: space must be one of"),
    ("mambo(space='x')", "mambo: space must be one of"),
    ("cfg_rescale(space='x')", "rescale: space must be one of"),
    ("perp_neg(space='x')", "perp_neg: space must be one of"),
    ("fdg(space='x')", "fdg: space must be one of"),
    ("adaptive(test_space='cosine')", "adaptive: test_space must be one of 'raw', 'eps', 'x0'"),
    ("cfg(rule='steps')", "cfg: rule must be one of 'sigma', 'step'"),
    ("adaptive(crossing='uncond')", "adaptive: crossing must be one of 'cfg', 'cond'"),
    ("sag(source='neg')", "sag: source must be one of 'auto', 'uncond', 'cond', got 'neg'"),
    ("sag(kernel_size=8)", "sag: kernel_size must be an odd positive integer"),
    ("autoguidance(guide=3)", "autoguidance: guide must be a Denoiser or the name of a registered model"),
    ("autoguidance(guide='tiny')", "autoguidance: unknown model 'tiny'"),
    ("cfg(schedule='cubic')", "cfg: unknown schedule 'cubic'"),
    ("cfg(sigma_lo=1, when=(1, 2))", "cfg: give the guidance interval either as when=(lo, hi) or as sigma_lo="),
    ("cfg(clamp=3)", "cfg: clamp is the floor of schedule='clamp_linear'"),
    ("fdg(scales=[8, 4], levels=3)", "fdg: give either scales=[high, ..., low] or scale_low, scale_high and levels"),
    ("tag(sigma_lo=1)", "tag: sigma_lo would apply to its CFG term, which it has only with scale != 1"),
]


@pytest.mark.parametrize("spec,message", WRONG_TYPE + DO_NOT_FIT)
def test_bad_options_name_the_method_and_the_option(spec, message):
    with pytest.raises(ValueError) as e:
        parse(spec)
    assert message in str(e.value)


def test_options_that_do_not_fit_from_python():
    with pytest.raises(ValueError, match=r"cfg: modifier must be a modifier object .*got 4"):
        g.cfg(3, 4)  # Python binds the second argument to modifier
    with pytest.raises(ValueError, match=r"cfg: modifier must be a modifier object .*got apg\(\)"):
        g.cfg(3, modifier=g.apg())  # a guidance, not a modifier
    with pytest.raises(ValueError, match="apg: space must be one of"):
        g.APG(space="pixels")

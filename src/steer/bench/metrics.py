"""The metrics a sweep can ask for, by testbed family, each explained in one line."""

from __future__ import annotations

import functools

import torch

from .. import metrics as m

__all__ = ["METRICS", "family", "labels_for", "check_metrics", "evaluate"]

METRICS = {  # name -> (families, one-line explanation)
    "accuracy": (("digits", "gmm"), "fraction of samples the classifier assigns to the requested class (higher: "
                                    "more faithful); digits: the shipped CNN, gmm: the exact Bayes classifier"),
    "fd": (("digits",), "Fréchet distance to the 1,797 real digits in the classifier's feature space (lower: closer "
                        "to the data)"),
    "saturation": (("digits",), "fraction of pixels more than 10% beyond the data range [-1, 1] (higher: more "
                                "oversaturated)"),
    "energy": (("gmm",), "energy distance to exact samples of the class-conditional mixture (0: same distribution; "
                         "the unbiased estimate can be slightly negative)"),
}


def family(model: str) -> str:
    if model.startswith("gmm"):
        return "gmm"
    if model.startswith("digits") or model == "flow-weak":
        return "digits"
    return "other"


def labels_for(model: str, n: int) -> torch.Tensor:
    return torch.arange(n) % (3 if family(model) == "gmm" else 10)


def check_metrics(model: str, names) -> None:
    fam = family(model)
    for name in names:
        if fam not in METRICS[name][0]:
            usable = [k for k, (fams, _) in METRICS.items() if fam in fams]
            raise ValueError(f"metric {name!r} does not apply to model {model!r}; allowed for it: "
                             f"{', '.join(usable) or 'none'}")


@functools.lru_cache(maxsize=None)
def _digits_reference():
    from ..testbeds import digits

    clf = digits.load("classifier")
    real, _ = digits.load_data()
    with torch.no_grad():
        return clf, clf.features(real)


def evaluate(model: str, x: torch.Tensor, labels: torch.Tensor, names, seed: int) -> dict[str, float]:
    x = x.float().cpu()
    out = {}
    if family(model) == "digits":
        clf, real_feats = _digits_reference()
        with torch.no_grad():
            feats, logits = clf.features(x), clf(x)
        values = {"accuracy": lambda: m.accuracy(logits, labels), "fd": lambda: m.frechet_distance(feats, real_feats),
                  "saturation": lambda: m.saturation(x, -1.1, 1.1)["frac_out"]}
    else:
        from ..testbeds import gmm

        mix = gmm.toy(dim=x.shape[1])
        values = {"accuracy": lambda: m.accuracy(mix.classifier_log_probs(x.double(), 0.0, "flow"), labels),
                  "energy": lambda: m.energy_distance(
                      x.double(), mix.sample(len(x), labels, torch.Generator().manual_seed(10_000 + seed)))}
    for name in names:
        out[name] = float(values[name]())
    return out

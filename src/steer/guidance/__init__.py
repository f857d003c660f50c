"""Guidance: branches → one batched evaluation → ``combine`` in the method's space → guided x0.

Every method is reachable by a spec string (``"apg(scale=10, eta=0)"``, stacks with ``+``) through ``parse``;
``REGISTRY`` lists them with their paper, space, cost and defaults (``steer methods``).
"""

from ..core import Branch, Ctx, Modifier
from .cfg import (
                  APG,
                  CFG,
                  CFGPP,
                  FDG,
                  MAMBO,
                  TAG,
                  TCFG,
                  Adaptive,
                  CFGZeroStar,
                  Characteristic,
                  DynamicThreshold,
                  PerpNeg,
                  Rescale,
                  ZeroStar,
                  adaptive,
                  apg,
                  cfg,
                  cfg_rescale,
                  cfg_zero_star,
                  cfgpp,
                  characteristic,
                  dynamic_threshold,
                  fdg,
                  mambo,
                  perp_neg,
                  tag,
                  tcfg,
)
from .core import REGISTRY, Corrector, Guidance, OutputModifier, Stack, Term, interval, parse
from .gradient import DPS, TFG, Classifier, FlowChef, Universal, classifier, dps, flowchef, tfg, universal
from .perturbation import (
                  NAG,
                  SAG,
                  Autoguidance,
                  NAGComfy,
                  Perturbed,
                  autoguidance,
                  nag,
                  nag_comfy,
                  pag,
                  sag,
                  seg,
                  slg,
                  tpg,
)
from .schedules import SCHEDULES, get_schedule

__all__ = ["REGISTRY", "Ctx", "Modifier", "Guidance", "OutputModifier", "Stack", "Term", "interval", "parse", "APG",
           "CFG", "CFGPP", "FDG", "MAMBO", "TAG", "TCFG", "Adaptive", "CFGZeroStar", "Characteristic",
           "DynamicThreshold", "PerpNeg", "Rescale", "ZeroStar", "adaptive", "apg", "cfg", "cfg_rescale",
           "cfg_zero_star", "cfgpp", "characteristic", "dynamic_threshold", "fdg", "mambo", "perp_neg", "tag", "tcfg",
           "SCHEDULES", "get_schedule", "Autoguidance", "Branch", "Perturbed", "autoguidance", "pag", "seg", "slg",
           "tpg", "NAG", "NAGComfy", "SAG", "nag", "nag_comfy", "sag", "Corrector", "Classifier", "DPS", "Universal",
           "TFG", "FlowChef", "classifier", "dps", "universal", "tfg", "flowchef"]

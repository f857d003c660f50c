"""The digits testbed: small real diffusion models on scikit-learn's bundled 8×8 handwritten digits.

- ``load_data()``: the 1,797 images of ``sklearn.datasets.load_digits`` (16 grey levels) scaled to [−1, 1], as a
  float tensor ``[N, 1, 8, 8]``, and their labels 0–9; ``split()`` a fixed stratified train / held-out split.
- ``load(name)``: the shipped checkpoints. ``"eps"`` (ε-prediction on the ``"vp-cosine"`` path, its network
  parameterised as ``ε̂ = σ·x_t + α·v̂`` so that ε̂ stays exact at the path's near-zero terminal SNR), ``"flow"``
  (rectified flow, velocity prediction), ``"flow-weak"`` (a smaller, shorter-trained flow model: the "bad version"
  of ``"flow"`` that autoguidance needs) come back as a :class:`DigitsModel` (a steer Denoiser, conditioned on
  labels 0–9 with 10 = ``NULL_LABEL`` the unconditional label); ``"classifier"`` is a :class:`DigitClassifier`
  whose ``features`` (128-d) serve Fréchet distances; ``"noisy-classifier"`` is a :class:`NoisyDigitClassifier`,
  ``p(c | x_t)`` at every noise level, for classifier guidance (``classifier(scale, classifier="digits")``).
- ``train_model`` / ``train_all``: the training recipes (``steer testbed train digits`` rebuilds the weights).

The weights live in ``steer/testbeds/weights/`` as float16 state dicts with a ``manifest.json`` holding each file's
SHA-256, the network config and the recipe; ``load`` verifies the checksum and loads the state dict with
``torch.load(..., weights_only=True)`` → ``load_state_dict`` (cast to float32), as for any user checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import io
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path as FilePath
from typing import Callable

import torch
import torch.nn as nn

from ..models import register_model
from ..paths import Path, get_path
from ..prediction import check_kind, convert
from .digits_net import NULL_LABEL, DigitClassifier, DigitsNet, NoisyDigitClassifier

__all__ = [
    "NAMES", "NULL_LABEL", "WEIGHTS_DIR", "MANIFEST", "REBUILD_COMMAND", "RECIPES", "Recipe", "WeightsError",
    "DigitsModel", "load", "load_data", "split", "train_model", "train_all", "tiny_recipes", "save",
    "load_state_dict_file",
]

NAMES = ("eps", "flow", "flow-weak", "classifier", "noisy-classifier")
WEIGHTS_DIR = FilePath(__file__).resolve().parent / "weights"
MANIFEST = "manifest.json"
REBUILD_COMMAND = "steer testbed train digits"
SPLIT_SEED = 0  # the held-out split is fixed, whatever the training seed
HELD_OUT = 0.2


class WeightsError(RuntimeError):
    """A shipped (or user-given) weights file is missing, corrupt or does not match its manifest."""


# ---------------------------------------------------------------------------------------------------
# Data


@functools.lru_cache(maxsize=1)
def _digits_arrays():
    from sklearn.datasets import load_digits

    d = load_digits()
    return d.images.copy(), d.target.copy()


def load_data() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits as ``(x, y)``: x float32 ``[N, 1, 8, 8]`` in [−1, 1] (0 → −1, 16 → 1), y long 0–9."""
    images, target = _digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).div(8.0).sub(1.0).unsqueeze(1)
    return x.contiguous(), torch.tensor(target, dtype=torch.long)


def split(held_out: float = HELD_OUT, seed: int = SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(train, test)`` of a stratified split of ``load_data()`` (fixed: the classifier's held-out set)."""
    from sklearn.model_selection import train_test_split

    _, y = load_data()
    idx = torch.arange(len(y)).numpy()
    tr, te = train_test_split(idx, test_size=held_out, stratify=y.numpy(), random_state=seed)
    return torch.from_numpy(tr).sort().values, torch.from_numpy(te).sort().values


# ---------------------------------------------------------------------------------------------------
# The Denoiser wrapper


def _forward(net, net_output: str, prediction: str, path: Path, x, t, labels):
    out = net(x, t, labels)
    if net_output == prediction:
        return out
    return convert(out, net_output, prediction, x, t.detach(), path)


class DigitsModel:
    """A trained :class:`DigitsNet` as a steer Denoiser: ``model(x_t, t, cond)`` with ``cond`` a long tensor of
    labels 0–9 (10 = null, unconditional), a single label, or ``None`` (all null).

    ``net_output`` is the kind the network itself outputs when it differs from ``prediction`` (the wrapper converts
    exactly, ``steer.prediction.convert``): the ``"eps"`` checkpoint's network outputs ``v`` so that
    ``ε̂ = σ·x_t + α·v̂`` stays exact where α → 0 (see ``RECIPES``). The network's parameters do not require
    gradients, but gradients with respect to ``x`` flow (for guidance methods that differentiate through the
    denoiser).
    """

    sample_shape = (1, 8, 8)
    null_label = NULL_LABEL
    n_classes = 10

    def __init__(self, net: DigitsNet, path: "str | Path", prediction: str, name: str | None = None,
                 net_output: str | None = None):
        self.net = net.eval().requires_grad_(False)
        self.path = get_path(path)
        self.prediction = check_kind(prediction)
        self.net_output = check_kind(net_output) if net_output is not None else self.prediction
        self.name = name

    def null_cond(self, cond=None, batch: int | None = None) -> torch.Tensor:
        """The unconditional labels (all ``NULL_LABEL``), with the batch of ``batch`` or of ``cond``."""
        if batch is None:
            batch = 1 if cond is None or torch.as_tensor(cond).ndim == 0 else len(cond)
        device = cond.device if isinstance(cond, torch.Tensor) else None
        return torch.full((batch,), NULL_LABEL, dtype=torch.long, device=device)

    def sites(self) -> dict:
        return self.net.sites()

    def _labels(self, cond, batch: int, device) -> torch.Tensor:
        if cond is None:
            return torch.full((batch,), NULL_LABEL, dtype=torch.long, device=device)
        labels = torch.as_tensor(cond, device=device)
        if (labels.is_floating_point() or labels.is_complex()) and labels.device.type == "cpu":
            if not torch.equal(labels, labels.round()):
                raise ValueError("digits cond must hold integer labels 0-9 (10 = null)")
        labels = labels.long().reshape(-1)
        if labels.numel() == 1 and batch != 1:
            labels = labels.expand(batch)
        if labels.shape[0] != batch:
            raise ValueError(f"cond has {labels.shape[0]} labels for a batch of {batch}")
        # the range check reads the labels on the host: only on the CPU, so a GPU forward does not synchronise
        if labels.device.type == "cpu" and labels.numel() and (int(labels.min()) < 0 or int(labels.max()) > NULL_LABEL):
            raise ValueError(f"digits labels must lie in 0-{NULL_LABEL} ({NULL_LABEL} = null), got "
                             f"{int(labels.min())}..{int(labels.max())}")
        return labels

    def __call__(self, x: torch.Tensor, t, cond=None) -> torch.Tensor:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.sample_shape:
            raise ValueError(f"digits models take x of shape [B, 1, 8, 8], got {tuple(x.shape)}")
        b = x.shape[0]
        t = torch.as_tensor(t, device=x.device, dtype=torch.float32).reshape(-1)
        if t.numel() == 1 and b != 1:
            t = t.expand(b)
        if t.shape[0] != b:
            raise ValueError(f"t has {t.shape[0]} values for a batch of {b}")
        xf = x.float()
        out = _forward(self.net, self.net_output, self.prediction, self.path, xf, t, self._labels(cond, b, x.device))
        return out.to(x.dtype)

    def to(self, device) -> "DigitsModel":
        self.net.to(device)
        return self

    def __repr__(self) -> str:
        n = sum(p.numel() for p in self.net.parameters())
        return (f"DigitsModel({self.name!r}, path={self.path.name!r}, prediction={self.prediction!r}, "
                f"params={n:,})")


# ---------------------------------------------------------------------------------------------------
# Recipes


@dataclass(frozen=True)
class Recipe:
    """How one checkpoint is trained.

    ``kind`` is ``"diffusion"`` (then ``path``, ``prediction``, ``p_uncond``, ``t_sampling`` apply),
    ``"classifier"`` or ``"noisy-classifier"`` (trained on ``cos θ · x0 + sin θ · ε`` with ``θ ~ U(0, π/2)``, the
    classifier's own path-independent input, see :class:`NoisyDigitClassifier`). AdamW with a linear warm-up and
    cosine decay to ``lr_final·lr``; the saved weights are an
    EMA of the iterates (decay ``min(ema, (1 + k)/(10 + k))`` at step k); batches are drawn without replacement
    epoch by epoch. ``t_sampling="uniform"``: t ~ U(0, 1]. The classifier is trained on ``split()``'s train part
    with random ±``shift`` pixel translations; diffusion models on all the data, without augmentation.
    """

    kind: str
    net: dict
    iters: int
    batch: int
    lr: float
    warmup: int = 100
    lr_final: float = 0.05
    weight_decay: float = 0.01
    ema: float = 0.999
    path: str | None = None
    prediction: str | None = None
    net_output: str | None = None
    p_uncond: float = 0.1
    t_sampling: str = "uniform"
    shift: int = 1
    seed_offset: int = 0
    grad_clip: float = 1.0

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


RECIPES: dict[str, Recipe] = {
    "classifier": Recipe("classifier", dict(width=32), iters=1500, batch=128, lr=2e-3, ema=0.995, seed_offset=3),
    "flow": Recipe("diffusion", dict(dim=96, depth=6, heads=4), iters=1500, batch=128, lr=1e-3,
                   path="flow", prediction="flow", seed_offset=1),
    # autoguidance's "bad version" (EDM2, arXiv 2406.02507): the same architecture at under a third of the
    # parameters, trained for about half as many steps
    "flow-weak": Recipe("diffusion", dict(dim=64, depth=4, heads=4), iters=800, batch=128, lr=1e-3,
                        path="flow", prediction="flow", ema=0.99, seed_offset=2),
    # ε-prediction with the ε loss; the network outputs v and the wrapper returns ε̂ = σ·x_t + α·v̂, because
    # vp-cosine has (almost) zero terminal SNR: α(1) ≈ 5e-5, and a network outputting ε̂ directly is ~4e-2 off
    # at t = 1, which the first solver step amplifies ~1000× (Lin et al., arXiv 2305.08891)
    "eps": Recipe("diffusion", dict(dim=96, depth=6, heads=4), iters=1500, batch=128, lr=1e-3,
                  path="vp-cosine", prediction="eps", net_output="v", seed_offset=0),
    # classifier guidance's p(c | x_t): the classifier's CNN with FiLM on the noise level, on the same train split
    "noisy-classifier": Recipe("noisy-classifier", dict(width=32), iters=1500, batch=128, lr=2e-3, ema=0.995,
                               seed_offset=4),
}
TRAIN_ORDER = ("classifier", "noisy-classifier", "flow", "flow-weak", "eps")


def tiny_recipes(iters: int = 3) -> dict[str, Recipe]:
    """The recipes shrunk to a few iterations of tiny networks (to exercise the training path in tests)."""
    small = {"classifier": dict(width=4), "noisy-classifier": dict(width=4, emb=8),
             "flow": dict(dim=16, depth=1, heads=2),
             "flow-weak": dict(dim=8, depth=1, heads=2), "eps": dict(dim=16, depth=1, heads=2)}
    return {k: dataclasses.replace(r, net=small[k], iters=iters, batch=16, warmup=1) for k, r in RECIPES.items()}


# ---------------------------------------------------------------------------------------------------
# Training


_CLASSES = {"classifier": DigitClassifier, "noisy-classifier": NoisyDigitClassifier, "diffusion": DigitsNet}


def _build(recipe: Recipe) -> nn.Module:
    return _CLASSES[recipe.kind](**recipe.net)


def _lr_at(recipe: Recipe, k: int) -> float:
    if k < recipe.warmup:
        return recipe.lr * (k + 1) / recipe.warmup
    p = (k - recipe.warmup) / max(1, recipe.iters - recipe.warmup)
    return recipe.lr * (recipe.lr_final + (1 - recipe.lr_final) * 0.5 * (1 + math.cos(math.pi * min(p, 1.0))))


def _sample_t(recipe: Recipe, n: int, gen: torch.Generator) -> torch.Tensor:
    if recipe.t_sampling == "uniform":
        return 1.0 - torch.rand(n, generator=gen, dtype=torch.float64)  # (0, 1]
    if recipe.t_sampling == "logit-normal":
        return torch.sigmoid(torch.randn(n, generator=gen, dtype=torch.float64)).clamp(1e-5, 1.0)
    raise ValueError(f"unknown t_sampling {recipe.t_sampling!r}; allowed: uniform, logit-normal")


def _shift_batch(x: torch.Tensor, shift: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by a random integer offset in [−shift, shift]² (background −1 fills in)."""
    if shift <= 0:
        return x
    b = x.shape[0]
    pad = torch.nn.functional.pad(x, (shift,) * 4, value=-1.0)
    dx = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    dy = torch.randint(0, 2 * shift + 1, (b,), generator=gen)
    rows = (dy[:, None] + torch.arange(8)[None])[:, :, None].expand(b, 8, 8)
    cols = (dx[:, None] + torch.arange(8)[None])[:, None, :].expand(b, 8, 8)
    return pad[torch.arange(b)[:, None, None], 0, rows, cols].unsqueeze(1)


def _loss(net: nn.Module, recipe: Recipe, path: Path | None, x0, y, gen) -> torch.Tensor:
    if recipe.kind == "classifier":
        return nn.functional.cross_entropy(net(_shift_batch(x0, recipe.shift, gen)), y)
    b = x0.shape[0]
    if recipe.kind == "noisy-classifier":
        theta = torch.rand(b, generator=gen) * (math.pi / 2)
        eps = torch.randn(x0.shape, generator=gen)
        c, s = theta.cos().view(b, 1, 1, 1), theta.sin().view(b, 1, 1, 1)
        return nn.functional.cross_entropy(net.logits(c * _shift_batch(x0, recipe.shift, gen) + s * eps, theta), y)
    t = _sample_t(recipe, b, gen)
    eps = torch.randn(x0.shape, generator=gen)
    a = path.alpha(t).float().view(b, 1, 1, 1)
    s = path.sigma(t).float().view(b, 1, 1, 1)
    xt = a * x0 + s * eps
    drop = torch.rand(b, generator=gen) < recipe.p_uncond
    labels = torch.where(drop, torch.full_like(y, NULL_LABEL), y)
    if recipe.prediction == "eps":
        target = eps
    elif recipe.prediction == "flow":
        da = path.d_alpha(t).float().view(b, 1, 1, 1)
        ds = path.d_sigma(t).float().view(b, 1, 1, 1)
        target = da * x0 + ds * eps  # rectified flow: ε − x0
    else:
        raise ValueError(f"recipe prediction {recipe.prediction!r} is not trained here (eps or flow)")
    pred = _forward(net, recipe.net_output or recipe.prediction, recipe.prediction, path, xt, t.float(), labels)
    return (pred - target).pow(2).mean()


@torch.no_grad()
def _ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    torch._foreach_lerp_(list(ema.parameters()), list(net.parameters()), 1.0 - decay)
    for be, b in zip(ema.buffers(), net.buffers()):
        be.copy_(b)


def train_model(name: str, recipe: Recipe | None = None, seed: int = 0,
                callback: Callable[[int, int, float], None] | None = None) -> tuple[nn.Module, dict]:
    """Train one checkpoint; returns ``(ema_module, info)`` (info: recipe, seed, final loss, seconds, metrics).

    ``callback(step, total, loss)`` is called after every step. Reproducible for a given seed (on one machine and
    thread count: float summation order can differ across hardware).
    """
    recipe = RECIPES[_check_name(name)] if recipe is None else recipe
    t0 = time.perf_counter()
    x_all, y_all = load_data()
    if recipe.kind != "diffusion":
        tr, te = split()
        x, y = x_all[tr], y_all[tr]
    else:
        x, y = x_all, y_all
    path = get_path(recipe.path) if recipe.kind == "diffusion" else None
    gen = torch.Generator().manual_seed(1000 * int(seed) + recipe.seed_offset)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(gen.initial_seed()))
        net = _build(recipe)
    net.train()
    ema = copy.deepcopy(net).requires_grad_(False)
    decay_params, other = [], []
    for n_, p in net.named_parameters():
        (decay_params if p.ndim >= 2 and "pos" not in n_ and "label" not in n_ else other).append(p)
    opt = torch.optim.AdamW([{"params": decay_params, "weight_decay": recipe.weight_decay},
                             {"params": other, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.99),
                            foreach=True)
    n = len(y)
    perm, pos = torch.randperm(n, generator=gen), 0
    loss_avg = None
    for k in range(recipe.iters):
        if pos + recipe.batch > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + recipe.batch]
        pos += recipe.batch
        for g in opt.param_groups:
            g["lr"] = _lr_at(recipe, k)
        loss = _loss(net, recipe, path, x[idx], y[idx], gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip:
            nn.utils.clip_grad_norm_(net.parameters(), recipe.grad_clip)
        opt.step()
        _ema_update(ema, net, min(recipe.ema, (1 + k) / (10 + k)))
        lv = float(loss.detach())
        loss_avg = lv if loss_avg is None else 0.98 * loss_avg + 0.02 * lv
        if callback is not None:
            callback(k + 1, recipe.iters, lv)
    ema.eval()
    info = {"recipe": recipe.as_dict(), "seed": int(seed), "final_loss_avg": round(loss_avg, 5) if loss_avg else None,
            "train_seconds": round(time.perf_counter() - t0, 1)}
    if recipe.kind == "classifier":
        with torch.no_grad():
            acc = (ema(x_all[te]).argmax(1) == y_all[te]).float().mean().item()
        info["metrics"] = {"held_out_accuracy": round(acc, 4), "held_out_n": len(te)}
    if recipe.kind == "noisy-classifier":  # held-out accuracy on x_t of the flow path at a few t (one noise draw)
        g = torch.Generator().manual_seed(0)
        accs = {}
        with torch.no_grad():
            for t in (0.0, 0.25, 0.5, 0.75, 0.9):
                eps = torch.randn(x_all[te].shape, generator=g)
                xt = (1 - t) * x_all[te] + t * eps
                accs[f"t={t}"] = round((ema(xt, t, "flow").argmax(1) == y_all[te]).float().mean().item(), 4)
        info["metrics"] = {"held_out_accuracy": accs["t=0.0"], "held_out_accuracy_flow_path": accs,
                           "held_out_n": len(te)}
    return ema, info


# ---------------------------------------------------------------------------------------------------
# Saving and loading


def _check_name(name: str) -> str:
    if name not in NAMES:
        raise ValueError(f"unknown digits checkpoint {name!r}; allowed: {', '.join(NAMES)}")
    return name


def _rebuild_hint(weights_dir: FilePath) -> str:
    if weights_dir.resolve() == WEIGHTS_DIR:
        return f"rebuild the weights with `{REBUILD_COMMAND}`"
    return f"rebuild them with `{REBUILD_COMMAND} --out {weights_dir}`"


def _atomic_write(path: FilePath, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; installed package data must be world-readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _state_bytes(module: nn.Module) -> bytes:
    sd = {k: (v.detach().to(torch.float16) if v.is_floating_point() else v.detach()).contiguous().clone()
          for k, v in module.state_dict().items()}
    buf = io.BytesIO()  # a buffer, not the file: the archive's inner name then never depends on the temp file name
    torch.save(sd, buf)
    return buf.getvalue()


def _read_manifest(weights_dir: FilePath, missing_ok: bool = False) -> dict:
    mf = weights_dir / MANIFEST
    if not mf.is_file():
        if missing_ok:
            return {"format": 1, "models": {}}
        raise WeightsError(f"digits weights manifest {mf} is missing; {_rebuild_hint(weights_dir)}")
    try:
        manifest = json.loads(mf.read_text())
        manifest["models"]
    except (ValueError, KeyError, TypeError) as e:
        if missing_ok:
            return {"format": 1, "models": {}}
        raise WeightsError(f"digits weights manifest {mf} is unreadable ({e}); {_rebuild_hint(weights_dir)}") from None
    return manifest


def save(name: str, module: nn.Module, info: dict, weights_dir: "str | os.PathLike | None" = None) -> dict:
    """Write ``module``'s float16 state dict to ``<weights_dir>/<name>.pt`` and record it in the manifest (both
    atomically). Returns the manifest entry."""
    _check_name(name)
    weights_dir = FilePath(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    data = _state_bytes(module)
    fname = f"{name}.pt"
    _atomic_write(weights_dir / fname, data)
    recipe = info["recipe"]
    config = dict(module.config) if hasattr(module, "config") else dict(recipe["net"])
    entry = {"file": fname, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data), "dtype": "float16",
             "kind": recipe["kind"], "class": type(module).__name__, "config": config,
             "params": sum(p.numel() for p in module.parameters())}
    if recipe["kind"] == "diffusion":
        entry.update(path=recipe["path"], prediction=recipe["prediction"],
                     net_output=recipe["net_output"] or recipe["prediction"])
    entry.update({k: v for k, v in info.items() if k != "recipe"}, recipe=recipe, torch=torch.__version__.split("+")[0])
    manifest = _read_manifest(weights_dir, missing_ok=True)
    manifest["format"] = 1
    manifest["rebuild"] = REBUILD_COMMAND
    manifest.setdefault("models", {})[name] = entry
    manifest["models"] = {k: manifest["models"][k] for k in NAMES if k in manifest["models"]}
    _atomic_write(weights_dir / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode())
    return entry


def load_state_dict_file(file: "str | os.PathLike", module: nn.Module, sha256: str | None = None) -> nn.Module:
    """Load a state-dict checkpoint into ``module`` (cast to float32): ``torch.load(..., weights_only=True)`` then
    ``load_state_dict``; with ``sha256``, the file's checksum is verified first."""
    file = FilePath(file)
    data = file.read_bytes()
    if sha256 is not None:
        got = hashlib.sha256(data).hexdigest()
        if got != sha256:
            raise WeightsError(f"checksum mismatch for {file}: expected sha256 {sha256[:16]}…, got {got[:16]}…")
    sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    module.load_state_dict(sd)
    return module


def load(name: str, weights_dir: "str | os.PathLike | None" = None):
    """A shipped checkpoint: ``"eps"``, ``"flow"``, ``"flow-weak"`` (a :class:`DigitsModel`), ``"classifier"``
    (a :class:`DigitClassifier`) or ``"noisy-classifier"`` (a :class:`NoisyDigitClassifier`), in eval mode on the
    CPU, float32. ``weights_dir`` reads another directory (as
    written by ``steer testbed train digits --out DIR``). The file's SHA-256 is checked against the manifest."""
    _check_name(name)
    weights_dir = FilePath(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    entry = _read_manifest(weights_dir)["models"].get(name)
    if entry is None:
        raise WeightsError(f"digits checkpoint {name!r} is not in {weights_dir / MANIFEST}; "
                           f"{_rebuild_hint(weights_dir)}")
    file = weights_dir / entry["file"]
    if not file.is_file():
        raise WeightsError(f"digits weights file {file} is missing; {_rebuild_hint(weights_dir)}")
    module = _CLASSES[entry["kind"]](**entry["config"])
    try:
        load_state_dict_file(file, module, sha256=entry["sha256"])
    except WeightsError as e:
        raise WeightsError(f"digits weights file {file} is corrupt ({e}); {_rebuild_hint(weights_dir)}") from None
    except Exception as e:  # unreadable archive or mismatching keys/shapes
        raise WeightsError(f"digits weights file {file} could not be loaded ({type(e).__name__}: {e}); "
                           f"{_rebuild_hint(weights_dir)}") from None
    if entry["kind"] != "diffusion":
        return module.eval().requires_grad_(False)
    return DigitsModel(module, entry["path"], entry["prediction"], name=name, net_output=entry.get("net_output"))


def train_all(weights_dir: "str | os.PathLike | None" = None, seed: int = 0, names=NAMES,
              recipes: dict[str, Recipe] | None = None,
              callback: Callable[[str, int, int, float], None] | None = None) -> dict:
    """Train and save the checkpoints ``names`` (default all) into ``weights_dir`` (default the package's).
    ``callback(name, step, total, loss)``. Returns ``{name: manifest entry}``."""
    recipes = RECIPES if recipes is None else recipes
    out = {}
    for name in TRAIN_ORDER:
        if name not in names:
            continue
        cb = None if callback is None else (lambda k, n, loss, _name=name: callback(_name, k, n, loss))
        module, info = train_model(name, recipes[name], seed=seed, callback=cb)
        out[name] = save(name, module, info, weights_dir)
    return out


for _name in ("eps", "flow", "flow-weak"):  # named models for spec strings: autoguidance(guide='flow-weak')
    register_model(f"digits-{_name}", functools.partial(load, _name))
register_model("flow-weak", functools.partial(load, "flow-weak"))

"""The digits testbed: shipped checkpoints load and verify, sample recognisable digits, and the training path runs."""

import hashlib
import json
import shutil

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import steer
from steer.cli import app
from steer.testbeds import digits
from steer.testbeds.digits_net import NULL_LABEL, DigitClassifier, DigitsNet, NoisyDigitClassifier

N = 300  # samples per sanity check, labels cycling 0–9
LABELS = torch.arange(N) % 10


@pytest.fixture(scope="module")
def data():
    return digits.load_data()


@pytest.fixture(scope="module")
def pixel_classifier(data):
    """An independent classifier: logistic regression on the raw pixels of all 1,797 digits."""
    from sklearn.linear_model import LogisticRegression

    x, y = data
    return LogisticRegression(max_iter=5000).fit(x.reshape(len(x), -1).numpy(), y.numpy())


@pytest.fixture(scope="module")
def models():
    return {name: digits.load(name) for name in digits.NAMES}


_samples = {}


def draw(models, name, scale, n=N):
    """``n`` samples (labels cycling 0–9), 25 dpmpp_2m steps, CFG at ``scale``, seed 0 (cached across tests)."""
    key = (name, scale, n)
    if key not in _samples:
        _samples[key] = steer.sample(models[name], cond=LABELS[:n], guidance=f"cfg(scale={scale})",
                                     solver="dpmpp_2m", steps=25, seed=0)
    return _samples[key]


def pixel_accuracy(clf, x):
    return float((clf.predict(x.reshape(len(x), -1).clamp(-1, 1).numpy()) == LABELS[:len(x)].numpy()).mean())


def frechet(a, b):
    """Fréchet distance between Gaussians fitted to two feature sets (numpy/scipy, float64)."""
    from scipy import linalg

    a, b = a.double().numpy(), b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(ca @ cb).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(ca) + np.trace(cb) - 2 * np.trace(covmean))


# ---------------------------------------------------------------------------------------------------
# Data and loading


def test_data_and_split(data):
    x, y = data
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0
    assert sorted(y.unique().tolist()) == list(range(10))
    tr, te = digits.split()
    assert len(tr) + len(te) == 1797 and not set(tr.tolist()) & set(te.tolist())
    counts = torch.bincount(y[te], minlength=10)
    assert int(counts.min()) >= 35 and int(counts.max()) <= 37  # stratified: 20 % of each class
    assert torch.equal(digits.split()[1], te)  # fixed


@pytest.mark.parametrize("name", digits.NAMES)
def test_each_checkpoint_loads_and_matches_its_checksum(name, models):
    manifest = json.loads((digits.WEIGHTS_DIR / digits.MANIFEST).read_text())
    entry = manifest["models"][name]
    data = (digits.WEIGHTS_DIR / entry["file"]).read_bytes()
    assert hashlib.sha256(data).hexdigest() == entry["sha256"]
    sd = torch.load(digits.WEIGHTS_DIR / entry["file"], weights_only=True)
    assert all(v.dtype == torch.float16 for v in sd.values() if v.is_floating_point())
    m = models[name]
    if name == "noisy-classifier":
        assert isinstance(m, NoisyDigitClassifier) and not m.training
        assert m(torch.zeros(2, 1, 8, 8), 0.5, "flow").shape == (2, 10)
        return
    if name == "classifier":
        assert isinstance(m, DigitClassifier) and not m.training
        assert m.features(torch.zeros(2, 1, 8, 8)).shape == (2, 128)
        return
    assert isinstance(m, digits.DigitsModel) and isinstance(m.net, DigitsNet) and not m.net.training
    assert m.path.name == entry["path"] and m.prediction == entry["prediction"]
    assert (m.path.name, m.prediction) == {"eps": ("vp-cosine", "eps"), "flow": ("flow", "flow"),
                                           "flow-weak": ("flow", "flow")}[name]
    assert m.sample_shape == (1, 8, 8)
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in m.net.parameters())
    assert set(m.sites()) == {f"blocks.{i}{s}" for i in range(m.net.config["depth"]) for s in ("", ".attn")}
    assert torch.equal(m.null_cond(LABELS[:5], 5), torch.full((5,), NULL_LABEL))
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.full((4,), 0.5)
    out = m(x, t, torch.tensor([0, 3, 7, 9]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(m(x, t, None), m(x, t, torch.full((4,), NULL_LABEL)))
    assert torch.equal(m(x, 0.5, 3), m(x, t, torch.full((4,), 3)))
    xg = x.clone().requires_grad_(True)  # gradients flow to x (gradient-based guidance)
    m(xg, t, None).sum().backward()
    assert xg.grad is not None and torch.isfinite(xg.grad).all()
    with pytest.raises(ValueError, match="0-10"):
        m(x, t, torch.tensor([0, 1, 2, 11]))


def test_flow_weak_is_smaller():
    manifest = json.loads((digits.WEIGHTS_DIR / digits.MANIFEST).read_text())["models"]
    assert manifest["flow-weak"]["params"] < manifest["flow"]["params"] / 2
    assert manifest["flow-weak"]["recipe"]["iters"] < manifest["flow"]["recipe"]["iters"]
    total = sum(e["bytes"] for e in manifest.values())
    assert total < 8e6


def test_unknown_name():
    with pytest.raises(ValueError, match="allowed: eps, flow, flow-weak, classifier, noisy-classifier"):
        digits.load("mnist")


def test_corrupt_or_missing_file_names_it_and_the_rebuild_command(tmp_path):
    shutil.copytree(digits.WEIGHTS_DIR, tmp_path / "w", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    w = tmp_path / "w"
    assert isinstance(digits.load("flow-weak", weights_dir=w), digits.DigitsModel)  # the copy loads
    raw = bytearray((w / "flow.pt").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (w / "flow.pt").write_bytes(bytes(raw))
    with pytest.raises(digits.WeightsError, match=r"flow\.pt is corrupt.*steer testbed train digits"):
        digits.load("flow", weights_dir=w)
    (w / "eps.pt").write_bytes(b"")
    with pytest.raises(digits.WeightsError, match=r"eps\.pt is corrupt.*steer testbed train digits"):
        digits.load("eps", weights_dir=w)
    (w / "classifier.pt").unlink()
    with pytest.raises(digits.WeightsError, match=r"classifier\.pt is missing.*steer testbed train digits"):
        digits.load("classifier", weights_dir=w)
    (w / digits.MANIFEST).write_text("{not json")
    with pytest.raises(digits.WeightsError, match=r"manifest\.json is unreadable.*steer testbed train digits"):
        digits.load("flow-weak", weights_dir=w)
    with pytest.raises(digits.WeightsError, match=r"manifest\.json is missing.*steer testbed train digits"):
        digits.load("flow", weights_dir=tmp_path / "nowhere")


# ---------------------------------------------------------------------------------------------------
# Quality


def test_classifier_held_out_accuracy(models, data):
    x, y = data
    _, te = digits.split()
    with torch.no_grad():
        acc = float((models["classifier"](x[te]).argmax(1) == y[te]).float().mean())
    assert acc >= 0.97, acc


def test_flow_cfg3_sanity_bar(models, pixel_classifier):
    x = draw(models, "flow", 3)
    acc = pixel_accuracy(pixel_classifier, x)
    assert acc >= 0.95, acc  # measured: 1.000 (the bar: ≥ 95 %)
    assert float(x.abs().max()) < 2.5


def test_eps_cfg3_accuracy(models, pixel_classifier):
    x = draw(models, "eps", 3, n=200)
    assert torch.isfinite(x).all() and float(x.abs().max()) < 3  # no blow-up at vp-cosine's t = 1 (α ≈ 5e-5)
    acc = pixel_accuracy(pixel_classifier, x)
    assert acc >= 0.95, acc  # measured: 1.000


def test_weak_model_is_worse_but_recognisable(models, pixel_classifier, data):
    clf = models["classifier"]
    with torch.no_grad():
        real = clf.features(data[0])
        fd = {(name, scale): frechet(clf.features(draw(models, name, scale).clamp(-1, 1)), real)
              for name in ("flow", "flow-weak") for scale in (1, 3)}
    # measured (N = 300; a 300-image subset of the real digits is at FD 17.3 from all of them):
    # cfg 1: flow 16.7, flow-weak 70.9; cfg 3: flow 43.3, flow-weak 80.0
    assert fd["flow-weak", 1] > 2.5 * fd["flow", 1], fd
    assert fd["flow-weak", 3] > 1.4 * fd["flow", 3], fd
    assert pixel_accuracy(pixel_classifier, draw(models, "flow-weak", 1)) < pixel_accuracy(
        pixel_classifier, draw(models, "flow", 1))  # measured: 0.930 < 0.963
    assert pixel_accuracy(pixel_classifier, draw(models, "flow-weak", 3)) >= 0.9  # still recognisable (1.000)
    try:
        from steer.metrics import frechet_distance
    except ImportError:
        return
    with torch.no_grad():
        fd2 = frechet_distance(clf.features(draw(models, "flow", 3).clamp(-1, 1)), real)
    assert fd2 == pytest.approx(fd["flow", 3], rel=1e-3, abs=1e-3)


# ---------------------------------------------------------------------------------------------------
# Training


def test_training_smoke(tmp_path):
    """Tiny networks, a few steps: the training code, atomic saving, manifest and loading round trip."""
    out = tmp_path / "w"
    entries = digits.train_all(out, seed=0, recipes=digits.tiny_recipes(iters=2), names=("flow", "classifier"))
    assert set(entries) == {"flow", "classifier"}
    manifest = json.loads((out / digits.MANIFEST).read_text())
    assert list(manifest["models"]) == ["flow", "classifier"]
    assert sorted(p.name for p in out.iterdir()) == ["classifier.pt", "flow.pt", "manifest.json"]  # no temp files
    m = digits.load("flow", weights_dir=out)
    assert m.net.config["dim"] == 16 and m(torch.zeros(2, 1, 8, 8), torch.full((2,), 0.5), None).shape == (2, 1, 8, 8)
    assert isinstance(digits.load("classifier", weights_dir=out), DigitClassifier)
    # the same seed gives the same weights; the CLI adds entries to the manifest
    again = digits.train_all(tmp_path / "again", seed=0, recipes=digits.tiny_recipes(iters=2), names=("flow",))
    assert again["flow"]["sha256"] == entries["flow"]["sha256"]
    res = CliRunner().invoke(app, ["testbed", "train", "digits", "--smoke", "--out", str(out),
                                   "--only", "eps,flow-weak,noisy-classifier"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    manifest = json.loads((out / digits.MANIFEST).read_text())
    assert list(manifest["models"]) == list(digits.NAMES)
    assert digits.load("eps", weights_dir=out).prediction == "eps"
    with pytest.raises(digits.WeightsError, match=f"steer testbed train digits --out {out}"):
        (out / "eps.pt").write_bytes(b"x")
        digits.load("eps", weights_dir=out)
    res = CliRunner().invoke(app, ["testbed", "train", "mnist"])
    assert res.exit_code != 0 and "digits" in res.output

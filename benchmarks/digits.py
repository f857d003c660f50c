"""Guidance methods on the shipped digits flow model: quality, faithfulness, saturation and cost, with image grids.

For each method and scale: 25 dpmpp_2m steps, ``--samples`` samples (labels cycling 0–9) for each of ``--seeds``
seeds. Metrics, against the 1,797 real digits, in the digit classifier's feature space: class accuracy, Fréchet
distance (FD), precision and recall (k = 3); saturation: the fraction of pixels beyond the data range [−1, 1] and
the mean excess |x| − 1 beyond it; NFE per sample. (The data sit at exactly ±1 in the background and strokes, so
the fraction counts pixels more than 10% beyond the range.) Mean ± std over seeds. Writes bench-out/digits.md
and a PNG grid per method and scale (10 samples of each digit) in bench-out/digits/ (--out).

Scales are in the w-form for every method (w = 1: the conditional model alone; perturbation terms add
(w − 1)(D_c − D_perturbed)). CFG++ uses λ = min(1, (w − 1)/11), its range [0, 1] mapped onto CFG's [1, 12].

    python benchmarks/digits.py [--samples 1000] [--seeds 3] [--scales 1.5 3 5 8 12]
"""
import argparse
import struct
import time
import zlib
from pathlib import Path

import torch

import steer
from steer import metrics
from steer.testbeds import digits


def methods(weak):
    return {
        "CFG": lambda w: f"cfg(scale={w})",
        "APG": lambda w: f"apg(scale={w}, eta=0, rescale=2.5, momentum=-0.5)",
        "CFG++": lambda w: f"cfgpp(scale={min(1.0, (w - 1) / 11):.4f})",
        "CFG-Zero*": lambda w: f"cfg_zero_star(scale={w}, zero_init_steps=1)",
        "interval CFG": lambda w: f"cfg(scale={w}, sigma_lo=0.28, sigma_hi=5.42)",
        "PAG": lambda w: f"pag(scale={w})",
        "SEG": lambda w: f"seg(scale={w})",
        "TPG": lambda w: f"tpg(scale={w})",
        "autoguidance": lambda w: steer.guidance.autoguidance(w, guide=weak),
    }


def write_png(path: Path, img: torch.Tensor) -> None:
    """A greyscale PNG from a [H, W] tensor in [−1, 1] (values outside are clipped), no imaging library needed."""
    a = ((img.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    raw = b"".join(b"\x00" + a[r].tobytes() for r in range(a.shape[0]))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", a.shape[1], a.shape[0], 8, 0, 0, 0, 0))
    png += chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(png)
    tmp.replace(path)


def grid(x: torch.Tensor, labels: torch.Tensor, per_class: int = 10, zoom: int = 4, pad: int = 1) -> torch.Tensor:
    """Rows = digits 0–9, ``per_class`` samples each, upscaled ``zoom``×, with a white gutter."""
    rows = []
    for c in range(10):
        items = x[labels == c][:per_class, 0]
        items = torch.nn.functional.interpolate(items[:, None], scale_factor=zoom, mode="nearest")[:, 0]
        items = torch.nn.functional.pad(items, (pad, pad, pad, pad), value=1.0)
        rows.append(torch.cat(list(items), dim=1))
    return torch.cat(rows, dim=0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--scales", type=float, nargs="+", default=[1.5, 3, 5, 8, 12])
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--only", nargs="*", help="run only these methods")
    ap.add_argument("--out", type=Path, default=Path("bench-out"),
                    help="folder for digits.md and digits/*.png (default bench-out/, outside the committed tree; "
                         "benchmarks/out/ holds the committed reference)")
    args = ap.parse_args()
    torch.set_num_threads(2)

    model, weak, clf = digits.load("flow"), digits.load("flow-weak"), digits.load("classifier")
    real, _ = digits.load_data()
    with torch.no_grad():
        real_feats = clf.features(real)
    labels = torch.arange(args.samples) % 10

    def evaluate(x):
        with torch.no_grad():
            feats, logits = clf.features(x), clf(x)
        pr = metrics.precision_recall(real_feats, feats, k=3)
        sat, sat10 = metrics.saturation(x), metrics.saturation(x, -1.1, 1.1)
        return {"acc": metrics.accuracy(logits, labels), "fd": metrics.frechet_distance(feats, real_feats),
                "precision": pr["precision"], "recall": pr["recall"], "sat_frac": sat10["frac_out"],
                "sat_excess": sat["excess"]}

    table = {}
    runs = [("none", None, lambda w: None)] + [(m, w, f) for m, f in methods(weak).items() for w in args.scales]
    if args.only:
        runs = [r for r in runs if r[0] in args.only or r[0] == "none"]
    t0 = time.time()
    for name, w, make in runs:
        per_seed = []
        for seed in range(args.seeds):
            with torch.no_grad():
                res = steer.sample(model, cond=labels, guidance=make(w), solver="dpmpp_2m", steps=args.steps, seed=seed,
                                   return_info=True)
            row = evaluate(res.x)
            row["nfe"] = res.nfe
            per_seed.append(row)
            if seed == 0:
                write_png(args.out / "digits" / f"{name.replace(' ', '_').replace('*', 'star').replace('+', 'p')}"
                                           f"_{'none' if w is None else f'{w:g}'}.png", grid(res.x, labels))
        table[(name, w)] = {k: torch.tensor([r[k] for r in per_seed], dtype=torch.float64) for k in per_seed[0]}
        m = table[(name, w)]
        print(f"{name:14s} w={w!s:5s} acc {m['acc'].mean():.3f} FD {m['fd'].mean():8.3f} "
              f"prec {m['precision'].mean():.3f} rec {m['recall'].mean():.3f} sat {m['sat_frac'].mean():.4f} "
              f"nfe {m['nfe'].mean():.0f}  [{time.time() - t0:.0f}s]", flush=True)

    fmt = lambda v, d=3: f"{v.mean():.{d}f} ± {v.std():.{d}f}" if len(v) > 1 else f"{v.mean():.{d}f}"  # noqa: E731
    lines = [f"Digits flow model, {args.steps} dpmpp_2m steps, {args.samples} samples × {args.seeds} seeds (mean ± std "
             "over seeds); features and accuracy from the shipped digit classifier; FD, precision and recall against "
             "the 1,797 real digits.", "",
             "| method | w | accuracy | FD | precision | recall | pixels beyond ±1.1 | mean excess beyond ±1 | NFE |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (name, w), m in table.items():
        lines.append(f"| {name} | {'-' if w is None else f'{w:g}'} | {fmt(m['acc'])} | {fmt(m['fd'], 2)} | "
                     f"{fmt(m['precision'])} | {fmt(m['recall'])} | {fmt(m['sat_frac'], 4)} | "
                     f"{fmt(m['sat_excess'], 4)} | {m['nfe'].mean():.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "digits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"\nwritten to {args.out / 'digits.md'} and {args.out / 'digits'}/*.png")


if __name__ == "__main__":
    main()

"""Particle steering and search on the digits flow model at equal compute: reward against total NFEs and wall time.

Task: the unconditional model (null label) steered towards a target digit d, reward ``log p(d | x0)`` under the
shipped digit classifier (as ``steer.rewards.digit_log_prob``, one target per run); every digit 0–9 as target,
``--per-digit``
independent runs each (one output sample per run). Budgets are multiples B of one unguided sample's NFE
(``--steps`` steps, 1 NFE per step): best-of-N with N = B (deterministic Euler), FK steering with K = B particles
(DDIM η = 1, λ = ``--lmbda``, diff potential, ESS < K/2, output: the best final particle), SVDD with M = B
candidates (DDIM η = 1, argmax), zero-order noise search with budget B (2 neighbours per round, Euler), classifier
guidance with the shipped noise-conditional digit classifier on the unconditional prediction (scale
``--classifier-scale``, B × ``--steps`` Euler steps: the budget buys steps; its classifier backward is not an NFE),
and the unguided baseline (B = 1). Accuracy is judged twice: by the reward's classifier (which the particle methods
optimise, so they can hack it) and by the noise-conditional classifier at t = 0 (a separately trained network,
the one classifier guidance follows).
Writes bench-out/particles.md and particles.svg (``--out``).

    python benchmarks/particles.py [--steps 10] [--budgets 2 4 8] [--per-digit 10]
"""
import argparse
import time
from pathlib import Path

import torch

import steer
from steer.testbeds import digits


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--budgets", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--per-digit", type=int, default=10)
    ap.add_argument("--lmbda", type=float, default=10.0)
    ap.add_argument("--classifier-scale", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=Path("bench-out"))
    args = ap.parse_args()
    torch.set_num_threads(2)
    model, clf, other = digits.load("flow"), digits.load("classifier"), digits.load("noisy-classifier")
    targets = torch.arange(10).repeat_interleave(args.per_digit)  # one condition (run) per output sample
    null = torch.full((len(targets),), digits.NULL_LABEL)

    def reward(x):
        """log p(d | x) with d the target of each row's run (rows come group-major, equally many per run)."""
        with torch.no_grad():
            logp = torch.log_softmax(clf(x.float()), dim=1)
        return logp.gather(1, targets.repeat_interleave(len(x) // len(targets))[:, None])[:, 0]

    def methods(B):
        return {
            "best-of-N": dict(method="best_of_n", particles=B, solver="euler"),
            "FK steering": dict(method="fk_steering", particles=B, solver="ddim(eta=1)", lmbda=args.lmbda,
                                output="best"),
            "SVDD": dict(method="svdd", candidates=B, solver="ddim(eta=1)"),
            "zero-order search": dict(method="noise_search", kind="zero_order", budget=B, neighbors=2,
                                      solver="euler"),
        }

    runs = [("unguided", 1, dict(method="best_of_n", particles=1, solver="euler"))]
    runs += [(name, B, opts) for B in args.budgets for name, opts in methods(B).items()]
    runs += [(f"classifier guidance (s={args.classifier_scale:g})", B, "gradient") for B in [1, *args.budgets]]
    rows = []
    for name, B, opts in runs:
        t0 = time.perf_counter()
        if opts == "gradient":  # the budget buys steps: B × steps, 1 NFE each (the classifier's backward is extra)
            spec = f"classifier(scale={args.classifier_scale}, classifier='digits', unconditional=True)"
            res = steer.sample(model, cond=targets, solver="euler", steps=args.steps * B,
                               seed=list(range(len(targets))), guidance=spec, return_info=True)
            samples = res.x
        else:
            with torch.no_grad():
                res = steer.smc(model, cond=null, steps=args.steps, seed=list(range(len(targets))), reward=reward,
                                **opts)
            samples = res.samples
        wall = time.perf_counter() - t0
        r = reward(samples).double()
        with torch.no_grad():
            a = (clf(samples).argmax(1) == targets).double()
            a2 = (other(samples, 0.0, model.path).argmax(1) == targets).double()
        n = len(r)
        row = dict(method=name, budget=B, nfe=res.nfe / (1 if opts == "gradient" else n), reward=r.mean().item(),
                   se=(r.std() / n**0.5).item(), acc=a.mean().item(), acc2=a2.mean().item(), wall=wall / n)
        rows.append(row)
        print(f"{name:18s} B={B:2d} NFE/sample {row['nfe']:6.0f} reward {row['reward']:8.3f} ± {row['se']:.3f} "
              f"acc {row['acc']:.3f} / {row['acc2']:.3f} wall {row['wall'] * 1000:.0f} ms/sample", flush=True)

    lines = [f"Digits flow model, unconditional, steered to each digit 0–9 ({args.per_digit} runs per digit, one "
             f"output each: {10 * args.per_digit} samples per row); reward log p(d | x) from the shipped digit "
             f"classifier; {args.steps} steps; NFE and wall time per output sample (2 CPU threads).", "",
             "| method | budget B | NFE / sample | reward (mean ± s.e.) | accuracy (reward's classifier) | "
             "accuracy (noise-conditional classifier, t = 0) | wall ms / sample |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['method']} | {row['budget']} | {row['nfe']:.0f} | {row['reward']:.3f} ± "
                     f"{row['se']:.3f} | {row['acc']:.3f} | {row['acc2']:.3f} | {row['wall'] * 1000:.0f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "particles.md").write_text("\n".join(lines) + "\n")
    (args.out / "particles.svg").write_text(svg(rows))
    print("\n".join(lines))


def svg(rows, w=520, h=320, pad=50) -> str:
    """Reward against NFE per sample (log2 x axis), one polyline per method."""
    import math

    xs = [math.log2(r["nfe"]) for r in rows]
    ys = [r["reward"] for r in rows]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda v: pad + (v - x0) / max(x1 - x0, 1e-9) * (w - 2 * pad)  # noqa: E731
    sy = lambda v: h - pad - (v - y0) / max(y1 - y0, 1e-9) * (h - 2 * pad)  # noqa: E731
    colours = ["#444", "#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w + 180}" height="{h}" font-family="sans-serif" '
           'font-size="11">',
           f'<text x="{w / 2}" y="15" text-anchor="middle">reward log p(d|x) vs NFE per sample (log scale)</text>',
           f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="black"/>',
           f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{h - pad}" stroke="black"/>',
           f'<text x="{pad - 5}" y="{sy(y1)}" text-anchor="end">{y1:.2f}</text>',
           f'<text x="{pad - 5}" y="{sy(y0)}" text-anchor="end">{y0:.2f}</text>']
    for v in sorted(set(xs)):
        out.append(f'<text x="{sx(v)}" y="{h - pad + 15}" text-anchor="middle">{2 ** v:.0f}</text>')
    base = [r for r in rows if r["method"] == "unguided"]
    names = [n for n in dict.fromkeys(r["method"] for r in rows) if n != "unguided"]
    for k, name in enumerate(names):
        own = [r for r in rows if r["method"] == name]
        pts = own if any(r["budget"] == 1 for r in own) else base + own
        c = colours[(k + 1) % len(colours)]
        out.append('<polyline fill="none" stroke="{}" points="{}"/>'.format(
            c, " ".join(f"{sx(math.log2(r['nfe'])):.1f},{sy(r['reward']):.1f}" for r in pts)))
        out.append(f'<text x="{w - pad + 10}" y="{pad + 14 * k}" fill="{c}">{name}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()

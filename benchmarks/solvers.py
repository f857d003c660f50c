"""steer's solvers against their diffusers counterparts: accuracy at matched NFE, and sampling-loop overhead.

(a) Accuracy. For each steer ODE solver with a matched diffusers scheduler (``make_scheduler``), both sample the
exact Gaussian-mixture denoiser (``gmm.toy``, class-conditional) from the same starting state and, where the
scheduler allows, on the same grid (the scheduler's: trailing spacing, uniform in t on vp-linear; FlowMatchEuler's
on the flow path). The error is the RMS difference from the reference probability-flow ODE solution
(``g.ode_solution``, DOP853, rtol 1e-11) from that state to the grid's last time (σ = 0; DEIS stops at σ_min).
NFE = network evaluations per sample, counted on both sides. Rows marked * are different methods: steer's
Taylor 3M (one extra warm-up NFE, so one step fewer) against diffusers' order-3 DPM-Solver++. Below 15 steps both
libraries lower the order of the last steps of DPM-Solver++ and DEIS (``lower_order_final``, on by default).

(b) Loop overhead. Wall time of ``steer.sample`` (the whole call) against diffusers' canonical loop
(``set_timesteps``; ``for t in timesteps: out = model(scale_model_input(x, t), t); x = step(out, t, x).prev_sample``)
driving the same tiny MLP on a 1×4×8×8 latent, batch 1, 50 steps; median of repeats after warm-up. Then the loop
alone: a flow model that costs almost nothing (one 16×16 matmul on a 16-dim state, batch 1), 200 steps of
steer's flow ``euler`` against diffusers' FlowMatchEulerDiscreteScheduler loop on the scheduler's grid (no autograd
context on either side: no tensor requires grad); per-step time of each side, goal steer / diffusers ≤ 1.0.

Writes a markdown report to stdout and ``--out`` (default bench-out/solvers.md).

    python benchmarks/solvers.py [--dim 2] [--samples 256] [--nfe 5 10 20] [--repeats 30] [--threads 1]
    python benchmarks/solvers.py --skip-accuracy --out /tmp/solvers.md   # the loop overhead only
"""
import argparse
import statistics
import time
from pathlib import Path

import torch

import steer
from steer.integrations.diffusers_schedulers import make_scheduler, run_scheduler, scheduler_levels, steer_noise
from steer.testbeds import gmm

# label, steer solver, diffusers counterpart (make_scheduler spec), path, prediction
ACCURACY = [
    ("euler", "euler", "euler", "vp-linear", "eps"),
    ("ddim(eta=0)", "ddim(eta=0)", "ddim", "vp-linear", "eps"),
    ("heun", "heun", "heun", "vp-linear", "eps"),
    ("dpmpp_2m", "dpmpp_2m", "dpmpp_2m", "vp-linear", "eps"),
    ("dpmpp_3m(published)", "dpmpp_3m(variant='published')", "dpmpp_3m", "vp-linear", "eps"),
    ("dpmpp_3m(taylor)*", "dpmpp_3m(variant='taylor')", "dpmpp_3m", "vp-linear", "eps"),
    ("unipc", "unipc", "unipc", "vp-linear", "eps"),
    ("deis", "deis", "deis", "vp-linear", "eps"),
    ("euler (flow)", "euler", "euler", "flow", "flow"),
    ("heun (flow)", "heun", "heun", "flow", "flow"),
]
OVERHEAD = ["euler", "ddim", "heun", "dpmpp_2m", "dpmpp_3m(variant='published')", "unipc", "deis"]


class Counting:
    """A Denoiser wrapper that counts network evaluations per sample."""

    def __init__(self, den):
        self.den, self.path, self.prediction, self.calls = den, den.path, den.prediction, 0

    def __call__(self, x, t, cond):
        self.calls += 1
        return self.den(x, t, cond)


def steps_for(solver: str, nfe: int, steer_side: bool) -> int:
    """Steps whose NFE is closest to ``nfe`` (ties to fewer): Heun costs 2 per step but 1 on its last step to
    σ = 0 (both sides); steer's Taylor 3M one extra NFE for its warm-up step."""
    if solver == "heun":
        return max(1, (nfe + 1) // 2)
    if steer_side and "taylor" in solver:
        return max(1, nfe - 1)
    return nfe


def rms(a, b) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def accuracy_table(args) -> list[str]:
    g = gmm.toy(dim=args.dim)
    z = torch.randn(args.samples, args.dim, generator=torch.Generator().manual_seed(args.seed))
    labels = torch.arange(args.samples) % g.n_classes
    lines = [f"### (a) Error against the reference ODE solution (gmm.toy(dim={args.dim}), {args.samples} samples, "
             "float32, RMS)", "",
             "| solver | path | NFE steer / diffusers | steer error | diffusers error | ratio steer/diffusers |",
             "|---|---|---|---|---|---|"]
    for label, solver, sched_spec, path, pred in ACCURACY:
        for nfe in args.nfe:
            den = Counting(g.denoiser(path=path, prediction=pred))
            sch = make_scheduler(sched_spec, path, pred)
            sched_steps = steps_for(sched_spec, nfe, steer_side=False)
            x_d, grid = run_scheduler(sch, den, z, labels, sched_steps)
            nfe_d = den.calls
            noise = steer_noise(sch, z, path, grid)  # both start from the scheduler's initial state
            steer_steps = steps_for(solver, nfe, steer_side=True)
            if steer_steps == sched_steps:
                s_grid = grid
            else:  # steer's Taylor 3M: same spacing (uniform in t from 1 to 0), one step fewer
                s_grid = torch.linspace(float(grid[0]), float(grid[-1]), steer_steps + 1, dtype=torch.float64)
            res = steer.sample(den.den, noise=noise, cond=labels, solver=solver, timesteps=s_grid, return_info=True)
            p = den.path
            start = noise.double() * float(torch.hypot(p.alpha(grid[0]), p.sigma(grid[0])))
            ref = g.ode_solution(start, float(grid[0]), float(grid[-1]), p, labels)
            e_s, e_d = rms(res.x, ref), rms(x_d, ref)
            lowered = " †" if sched_spec in ("dpmpp_3m", "deis") and sched_steps < 15 else ""  # both lower the order
            lines.append(f"| `{label}` | {path} | {res.nfe} / {nfe_d}{lowered} | {e_s:.3e} | {e_d:.3e} | "
                         f"{e_s / e_d:.3f} |")
            print(lines[-1], flush=True)
    lines += ["", "- \\* steer's Taylor 3M (2·A2 on D2, warm-up step +1 NFE, so one step fewer on a "
              "uniform grid) against diffusers' order-3 DPM-Solver++ (A2, = steer's `variant='published'`).",
              "- † below 15 steps both libraries lower the order of the last steps (`lower_order_final`).",
              "- Both sides start from the scheduler's initial state (`steer_noise`); the grid is the scheduler's "
              "(trailing spacing, uniform in t from t = 1; DEIS ends at σ_min, t = 1/T)."]
    return lines


class TinyNet(torch.nn.Module):
    """A 2-layer MLP on a flattened 4×8×8 latent plus the time, returning the latent's shape."""

    def __init__(self, d: int = 256, hidden: int = 256):
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(d + 1, hidden), torch.nn.Linear(hidden, d)

    def forward(self, x, t):
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1).expand(x.shape[0], 1)
        h = torch.nn.functional.silu(self.l1(torch.cat([x.flatten(1), t], dim=1)))
        return 0.1 * self.l2(h).reshape(x.shape)


def _median_ms(fns, repeats: int, warmup: int) -> list[float]:
    """Median wall time (ms) of each function, the functions interleaved so they see the same machine load."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return [1e3 * statistics.median(ts) for ts in times]


def overhead_table(args) -> list[str]:
    torch.manual_seed(0)
    net = TinyNet().eval()
    model = steer.denoiser(lambda x, t, cond: net(x, t), path="vp-linear", prediction="eps")
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    steps = args.loop_steps
    lines = ["", f"### (b) Sampling-loop wall time, tiny MLP on a 1×4×8×8 latent, batch 1, {steps} steps "
             f"(median of {args.repeats}, {torch.get_num_threads()} thread(s))", "",
             "| solver | NFE | model calls alone (ms) | steer (ms) | diffusers (ms) | ratio steer/diffusers | "
             "overhead per step steer / diffusers (µs) |",
             "|---|---|---|---|---|---|---|"]
    with torch.inference_mode():
        for solver in OVERHEAD:
            sch = make_scheduler(solver, "vp-linear")
            sch.set_timesteps(steps)
            n_calls = len(sch.timesteps)
            t_in = torch.rand(())

            def model_only():
                x = z
                for _ in range(n_calls):
                    x = net(x, t_in)

            def steer_loop():
                return steer.sample(model, noise=z, solver=solver, steps=steps)

            def diffusers_loop():
                sch.set_timesteps(steps)
                x = z * sch.init_noise_sigma
                for t in sch.timesteps:
                    out = net(sch.scale_model_input(x, t), t)
                    x = sch.step(out, t, x).prev_sample
                return x

            m, s, d = _median_ms([model_only, steer_loop, diffusers_loop], args.repeats, args.warmup)
            lines.append(f"| `{solver}` | {n_calls} | {m:.2f} | {s:.2f} | {d:.2f} | {s / d:.2f} | "
                         f"{1e3 * (s - m) / steps:.0f} / {1e3 * (d - m) / steps:.0f} |")
            print(lines[-1], flush=True)
    return lines


def trivial_model_table(args) -> list[str]:
    """The loop alone: steer's flow Euler against FlowMatchEulerDiscreteScheduler on a model that costs almost
    nothing, on the same grid (the scheduler's)."""
    dim, steps = 16, args.trivial_steps
    weight = 0.1 * torch.randn(dim, dim, generator=torch.Generator().manual_seed(0))
    model = steer.denoiser(lambda x, t, cond: x @ weight, path="flow", prediction="flow")
    z = torch.randn(1, dim, generator=torch.Generator().manual_seed(1))
    sch = make_scheduler("euler", "flow", "flow")  # FlowMatchEulerDiscreteScheduler, shift 1
    sch.set_timesteps(steps)
    _, grid = scheduler_levels(sch, "flow")

    def model_only():
        x = z
        for _ in range(steps):
            x = x @ weight

    def steer_loop():
        return steer.sample(model, noise=z, solver="euler", timesteps=grid)

    def diffusers_loop():
        sch.set_timesteps(steps)
        x = z
        for t in sch.timesteps:
            x = sch.step(x @ weight, t, x).prev_sample
        return x

    gap = float((steer_loop() - diffusers_loop()).abs().max())
    assert gap < 1e-5, f"steer and diffusers disagree on the trivial model: max |Δ| = {gap:.2e}"
    m, s, d = (1e3 * ms / steps for ms in _median_ms([model_only, steer_loop, diffusers_loop], args.repeats,
                                                      args.warmup))
    lines = ["", f"### (b′) The loop alone: a near-free flow model (x ↦ x·W, 16 dims), batch 1, {steps} flow "
             f"Euler steps (median of {args.repeats}, {torch.get_num_threads()} thread(s))", "",
             "| model alone per step (µs) | steer per step (µs) | diffusers per step (µs) | "
             "ratio steer/diffusers (goal ≤ 1.0) | max abs. difference steer vs diffusers |",
             "|---|---|---|---|---|",
             f"| {m:.1f} | {s:.1f} | {d:.1f} | {s / d:.2f} {'✓' if s <= d else '✗'} | {gap:.1e} |"]
    print(lines[-1], flush=True)
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dim", type=int, default=2, help="dimension of the Gaussian-mixture testbed")
    ap.add_argument("--samples", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    ap.add_argument("--loop-steps", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings)")
    ap.add_argument("--skip-accuracy", action="store_true")
    ap.add_argument("--skip-overhead", action="store_true")
    ap.add_argument("--trivial-steps", type=int, default=200, help="steps of the near-free flow model's loop")
    ap.add_argument("--out", type=Path, default=Path("bench-out") / "solvers.md",
                    help="where to write (default bench-out/, outside the committed tree; "
                         "benchmarks/out/ holds the committed reference)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import diffusers

    lines = [f"## steer vs diffusers {diffusers.__version__} (torch {torch.__version__})", ""]
    if not args.skip_accuracy:
        lines += accuracy_table(args)
    if not args.skip_overhead:
        lines += overhead_table(args)
        lines += trivial_model_table(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()

"""Checks of the open loop on a CUDA device (issue 7), on the cheap toy latent model (steer.testbeds.toy) and the
digits testbed; the CPU test suite cannot see devices.

1. Every registered method × every solver × float32/float16/bfloat16 at 4×64×64 on CUDA: the sample is finite, keeps
   the noise's dtype and device, and is close to the float32 CUDA sample (relative RMS; float16 < 2e-2, bfloat16
   < 1e-1, as tests/test_dtypes.py on the CPU).
2. Host-device synchronisations per step of each method with Euler (CUDA's sync debug mode), against the goal of at
   most one per step (Adaptive Guidance needs its latch on the host to skip a pass: one more).
3. What failed on CUDA before: ``ddim(time_shift=True)``, a CUDA ``timesteps`` tensor on a VP path,
   ``autoguidance(guide='flow-weak')`` on the digits model, noise drawn with ``device=``; per-item CUDA generators
   give batch invariance with a stochastic solver; ``seed=`` gives the same sample on the CPU and on CUDA.
4. Memory of a model whose parameters require grad does not grow with the number of steps.

    python benchmarks/gpu_checks.py [--device cuda] [--out bench-out/gpu_checks.md]
"""
import argparse
import json
import time
import warnings
from datetime import datetime
from pathlib import Path

import torch

import steer
from steer.guidance import REGISTRY
from steer.solvers import SOLVERS
from steer.testbeds import digits
from steer.testbeds.toy import ToyLatentModel, example_guidance

RENOISE = ("ddim", "ddpm", "euler", "euler_ancestral", "dpmpp_2m")
TOL = {torch.float16: 2e-2, torch.bfloat16: 1e-1}


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def matrix(device) -> tuple[list[str], dict]:
    model = ToyLatentModel((4, 64, 64)).to(device)
    noise = torch.randn(1, 4, 64, 64, generator=torch.Generator().manual_seed(0)).to(device)
    failures, worst = [], {d: 0.0 for d in TOL}
    t0 = time.time()
    for method in sorted(REGISTRY):
        kw = dict(cond=torch.tensor([3], device=device), guidance=example_guidance(method), steps=3,
                  negative=torch.tensor([5], device=device) if method == "perp_neg" else None)
        for solver in SOLVERS:
            if steer.guidance.parse(kw["guidance"]).needs_renoise and solver not in RENOISE:
                continue  # CFG++ re-noises with its own estimate: only these solvers take it
            if method == "tag" and solver not in ("ddim", "ddpm", "euler", "euler_ancestral"):
                continue  # TAG refuses solvers other than one-evaluation first-order ones
            try:
                ref = steer.sample(model, noise=noise, solver=solver, seed=0, **kw)
                for dtype, tol in TOL.items():
                    x = steer.sample(model, noise=noise.to(dtype), solver=solver, seed=0, **kw)
                    err = rel(x, ref)
                    worst[dtype] = max(worst[dtype], err)
                    if x.dtype != dtype or x.device != noise.device or not torch.isfinite(x).all() or err >= tol:
                        failures.append(f"{method} × {solver} × {dtype}: dtype {x.dtype}, device {x.device}, "
                                        f"finite {bool(torch.isfinite(x).all())}, error {err:.3g}")
            except Exception as e:  # report and go on
                failures.append(f"{method} × {solver}: {type(e).__name__}: {e}")
    lines = [f"### 1. Every method × every solver × dtype on {_name(device)} (4×64×64, 3 steps)",
             "", f"{len(failures)} failures; worst relative RMS distance to float32: float16 "
             f"{worst[torch.float16]:.2e}, bfloat16 {worst[torch.bfloat16]:.2e} ({time.time() - t0:.0f} s)", ""]
    lines += [f"- {f}" for f in failures[:40]]
    return lines, {"failures": failures, "worst": {str(k): v for k, v in worst.items()}}


def _name(device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


def syncs(device) -> tuple[list[str], dict]:
    if device.type != "cuda":
        return ["### 2. (synchronisations are counted on CUDA only)"], {}
    model = ToyLatentModel((4, 64, 64)).to(device)
    noise = torch.randn(2, 4, 64, 64, device=device, dtype=torch.float16)
    steps, out = 10, {}
    for method in sorted(REGISTRY):
        kw = dict(cond=torch.tensor([3, 4], device=device), guidance=example_guidance(method), steps=steps,
                  solver="euler", negative=torch.tensor([5, 6], device=device) if method == "perp_neg" else None)
        steer.sample(model, noise=noise, **kw)  # warm caches
        torch.cuda.synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                steer.sample(model, noise=noise, **kw)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        out[method] = sum("synchroniz" in str(w.message) for w in caught) / steps
    lines = ["### 2. Host-device synchronisations per step (Euler, 10 steps, float16, batch 2)", "",
             "| method | syncs per step |", "|---|---|"] + [f"| {m} | {v:.1f} |" for m, v in out.items()]
    return lines, out


def devices(device) -> tuple[list[str], dict]:
    res = {}

    def check(name, fn):
        try:
            res[name] = fn()
        except Exception as e:
            res[name] = f"FAILED: {type(e).__name__}: {e}"

    toy = ToyLatentModel((4, 32, 32), path="vp-scaled-linear", prediction="eps").to(device)
    labels = torch.tensor([1, 2], device=device)
    check("ddim(time_shift=True) on CUDA", lambda: bool(torch.isfinite(
        steer.sample(toy, cond=labels, solver="ddim(time_shift=True)", steps=10, device=device, seed=0)).all()))
    grid = torch.linspace(0.999, 0.0, 11, device=device)
    check("CUDA timesteps tensor on a VP path", lambda: bool(torch.isfinite(
        steer.sample(toy, cond=labels, timesteps=grid, device=device, seed=0)).all()))
    flow = digits.load("flow").to(device)
    check("autoguidance(guide='flow-weak') on CUDA (digits)", lambda: str(steer.sample(
        flow, cond=torch.arange(4, device=device), guidance="autoguidance(scale=2, guide='flow-weak')", steps=8,
        seed=0).device))
    check("noise drawn on device= (dtype float16)", lambda: str(
        (lambda x: (x.device, x.dtype))(steer.sample(toy, cond=labels, steps=4, device=device, dtype=torch.float16))))

    def invariance():
        gens = lambda seeds: [torch.Generator(device).manual_seed(s) for s in seeds]  # noqa: E731
        kw = dict(solver="euler_ancestral", steps=8, device=device)
        batch = steer.sample(toy, cond=torch.tensor([1, 2, 3], device=device), generator=gens([5, 6, 7]), **kw)
        alone = steer.sample(toy, cond=torch.tensor([2], device=device), generator=gens([6]), **kw)
        return float((batch[1:2] - alone).abs().max())

    check("per-item CUDA generators, euler_ancestral: largest batch-vs-alone difference", invariance)

    def same_seed():
        cpu = steer.sample(toy.to("cpu"), cond=torch.tensor([1, 2]), solver="dpmpp_2m_sde", steps=8, seed=3)
        toy.to(device)
        gpu = steer.sample(toy, cond=labels, solver="dpmpp_2m_sde", steps=8, seed=3, device=device)
        return rel(gpu.cpu(), cpu)

    check("seed=3, dpmpp_2m_sde: relative distance CPU vs CUDA", same_seed)

    class Net(torch.nn.Module):  # parameters require grad, as a diffusers UNet's
        path, prediction = steer.get_path("flow"), "flow"

        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(4, 4, 3, padding=1)

        def forward(self, x, t, cond):
            return self.conv(x) * t[:, None, None, None]

    net = Net().to(device)

    def peak(steps):
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        steer.sample(net, noise=torch.randn(4, 4, 128, 128, device=device), cond=torch.ones(4, device=device),
                     uncond=torch.zeros(4, device=device), guidance="apg(scale=4)", steps=steps)
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20

    if device.type == "cuda":
        check("peak MiB above start, 5 / 50 steps, params requiring grad", lambda: f"{peak(5):.1f} / {peak(50):.1f}")
    lines = ["### 3–4. Devices, generators and memory", "", "| check | result |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in res.items()]
    return lines, res


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=Path("bench-out") / "gpu_checks.md")
    args = ap.parse_args()
    device = torch.device(args.device)
    head = [f"## GPU checks, {datetime.now():%Y-%m-%d}, {_name(device)}, torch {torch.__version__}",
            ""]
    guide = ToyLatentModel((4, 64, 64), seed=1).to(device)
    steer.models.register_model("toy-guide", lambda: guide)
    raw, body = {}, []
    for name, fn in (("devices", devices), ("syncs", syncs), ("matrix", matrix)):
        lines, raw[name] = fn(device)
        body += lines + [""]
        print("\n".join(lines), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(head + body))
    args.out.with_suffix(".json").write_text(json.dumps(raw, indent=1, default=str))


if __name__ == "__main__":
    main()

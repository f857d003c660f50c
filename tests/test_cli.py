import json

import numpy as np
from typer.testing import CliRunner

from steer.cli import app
from steer.solvers import SOLVERS

runner = CliRunner()


def test_solvers_lists_every_solver():
    res = runner.invoke(app, ["solvers", "--json"])
    assert res.exit_code == 0
    rows = json.loads(res.output)
    assert [r["name"] for r in rows] == list(SOLVERS)
    assert {r["name"]: r["order"] for r in rows}["dpmpp_3m"] == 3
    res = runner.invoke(app, ["solvers", "--long"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "dpmpp_3m" in res.output and "arXiv 2211.01095" in res.output


def test_sample_gmm_and_save(tmp_path):
    out = tmp_path / "x.npy"
    res = runner.invoke(app, ["sample", "--model", "gmm", "--n", "60", "--steps", "8", "--solver", "heun",
                              "--guidance", "cfg(scale=2)", "--out", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "heun" in res.output and "30" in res.output  # NFE/sample: 15 evaluations x 2 branches
    assert np.load(out).shape == (60, 2)


def test_compare_solvers_table():
    res = runner.invoke(app, ["sample", "--compare-solvers", "--n", "16", "--path", "vp-linear"],
                        env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "RMS error" in res.output and "unipc" in res.output


def test_bad_inputs_exit_2_with_message():
    res = runner.invoke(app, ["sample", "--model", "mnist"])
    assert res.exit_code == 2 and "unknown model 'mnist'; allowed: gmm, digits, digits-eps" in res.output
    res = runner.invoke(app, ["sample", "--solver", "rk4", "--n", "4"])
    assert res.exit_code == 2 and "unknown solver 'rk4'" in res.output
    res = runner.invoke(app, ["sample", "--path", "vp"])
    assert res.exit_code == 2 and "unknown path 'vp'" in res.output


def test_methods_lists_every_guidance_method():
    from steer.guidance import REGISTRY

    res = runner.invoke(app, ["methods", "--json"])
    assert res.exit_code == 0
    rows = {r["name"]: r for r in json.loads(res.output)}
    assert set(rows) == set(REGISTRY) and {"cfg", "apg", "cfgpp", "cfg_zero_star", "fdg", "perp_neg"} <= set(rows)
    assert rows["apg"]["arxiv"] == "2410.02416" and rows["apg"]["defaults"]["eta"] == 0.0
    assert all(r["paper"] and r["space"] and r["extra_nfe"] and r["defaults_source"] for r in rows.values())
    res = runner.invoke(app, ["methods"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "cfg_zero_star" in res.output


def _one_line_error(res, code: int) -> str:
    """The error line on stderr, checking it is the only line there and that no traceback was printed."""
    assert res.exit_code == code, res.output
    assert isinstance(res.exception, SystemExit) and "Traceback" not in res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.output
    return lines[0]


def test_bad_guidance_spec_exits_2_with_one_line():
    res = runner.invoke(app, ["sample", "--n", "4", "--guidance", "cfg(3, 4)"])
    assert _one_line_error(res, 2).startswith("error: cfg takes at most 1 positional argument (scale) in a spec")
    res = runner.invoke(app, ["sample", "--n", "4", "--guidance", "cfg(scale='a')"])
    assert _one_line_error(res, 2) == "error: cfg: scale must be a number, got 'a' (str)"
    res = runner.invoke(app, ["sample", "--n", "4", "--guidance", "cfgpp(scale=0.5)", "--solver", "heun"])
    assert "cannot use" in _one_line_error(res, 2)


def test_non_finite_run_exits_1_with_one_line():
    res = runner.invoke(app, ["sample", "--n", "8", "--steps", "4", "--guidance", "cfg(scale=1e308)"])
    # CFG at w = 1e308 overflows in the combine, from finite model outputs: the guidance is named
    assert _one_line_error(res, 1).startswith("error: sampling failed: the guidance made NaN or inf at step 0")


def test_unwritable_out_exits_1_with_one_line(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("")
    res = runner.invoke(app, ["sample", "--n", "8", "--steps", "2", "--out", str(blocker / "x.npy")])
    assert _one_line_error(res, 1) == (f"error: cannot write the samples to {blocker / 'x.npy'}: "
                                       f"{blocker} is not a directory")


def test_python_dash_m_steer():
    import os
    import subprocess
    import sys

    import steer

    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(steer.__file__))}

    def run(*args):
        return subprocess.run([sys.executable, "-m", "steer", *args], capture_output=True, text=True, env=env,
                              timeout=120)

    res = run("methods", "--json")
    assert res.returncode == 0, res.stderr
    from steer.guidance import REGISTRY

    assert [r["name"] for r in json.loads(res.stdout)] == list(REGISTRY)
    res = run("sample", "--n", "4", "--guidance", "cfg(3, 4)")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.startswith("error: cfg takes at most 1 positional argument") and "Traceback" not in res.stderr

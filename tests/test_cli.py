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
    res = runner.invoke(app, ["solvers"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "dpmpp_3m" in res.output and "arXiv 2211.01095" in res.output


def test_sample_gmm_and_save(tmp_path):
    out = tmp_path / "x.npy"
    res = runner.invoke(app, ["sample", "--model", "gmm", "--n", "60", "--steps", "8", "--solver", "heun",
                              "--guidance", "cfg(scale=2)", "--out", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "heun" in res.output and "30" in res.output  # NFE/sample: 15 evaluations x 2 branches
    assert np.load(out).shape == (60, 2)


def test_compare_solvers_table():
    res = runner.invoke(app, ["sample", "--compare-solvers", "--n", "16", "--path", "vp-linear"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "RMS error" in res.output and "unipc" in res.output


def test_bad_inputs_exit_2_with_message():
    res = runner.invoke(app, ["sample", "--model", "digits"])
    assert res.exit_code == 2 and "unknown model 'digits'; allowed: gmm" in res.output
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

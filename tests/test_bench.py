"""The benchmark harness: configs and their errors, a resumable store that survives SIGKILL."""

import os
import random
import signal
import sqlite3
import subprocess
import sys
import time

import numpy
import pytest
import torch

import steer
from steer.bench import ConfigError, Store, load_sweep, run

SWEEP = """
name = "kill-test"
models = ["gmm-flow"]
solvers = ["euler", "heun", "dpmpp_2m", "unipc"]
steps = [4, 8, 16]
seeds = [0]
samples = 400
metrics = ["accuracy", "energy"]

[[guidance]]
method = "none"

[[guidance]]
method = "cfg"
scale = [2]
"""


def write(tmp_path, text, name="sweep.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def metrics_by_key(db):
    store = Store(db)
    rows = store.rows()
    store.close()
    return {r["key"]: (r["result"]["metrics"], r["result"]["nfe"]) for r in rows}


def test_a_sweep_killed_with_sigkill_resumes_with_every_cell_once(tmp_path):
    """Kill the runner (SIGKILL) at a random point after its first cell, rerun it: every cell is in the database
    exactly once, with the metrics of an uninterrupted run (same seeds, same numbers: equal to 1e-12, the rounding of
    float64 reductions whose order can differ between processes), and every sample file it names exists."""
    config = write(tmp_path, SWEEP)
    _, cells = load_sweep(config)
    killed = tmp_path / "killed.sqlite"
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(steer.__file__))}
    proc = subprocess.Popen([sys.executable, "-m", "steer.bench.run", str(config), "--db", str(killed),
                             "--no-progress"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    done = 0
    while time.time() < deadline and proc.poll() is None:
        if killed.exists():
            try:
                done = sqlite3.connect(killed, timeout=5).execute("SELECT COUNT(*) FROM cells").fetchone()[0]
            except sqlite3.OperationalError:  # the table is being created
                done = 0
        if done >= 1:
            break
        time.sleep(0.05)
    time.sleep(random.Random().uniform(0, 0.4))  # a random point after the first cell
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert done >= 1, proc.stderr.read().decode()
    partial = metrics_by_key(killed)
    assert 1 <= len(partial) <= len(cells)

    status = run(config, killed, progress=False)
    assert status["done"] == status["total"] == len(cells)
    resumed = metrics_by_key(killed)
    uninterrupted = metrics_by_key(run(config, tmp_path / "clean.sqlite", progress=False) and tmp_path / "clean.sqlite")
    assert set(resumed) == set(uninterrupted) == {c.key for c in cells}
    for key, (values, nfe) in resumed.items():  # equal up to float64 reduction order across processes
        assert nfe == uninterrupted[key][1] and values == pytest.approx(uninterrupted[key][0], rel=1e-12, abs=1e-15)
    store = Store(killed)
    assert len(store.rows()) == len(cells)  # the primary key holds each cell once
    for row in store.rows():
        assert store.samples(row["samples"]).shape == (400, 2)
    store.close()


def test_rerunning_a_finished_sweep_runs_nothing(tmp_path):
    config = write(tmp_path, SWEEP.replace('"unipc"]', '"unipc"]\n').replace("[4, 8, 16]", "[4]"))
    db = tmp_path / "r.sqlite"
    run(config, db, progress=False)
    before = Store(db).rows()
    t0 = time.time()
    assert run(config, db, progress=False)["done"] == len(before)
    assert Store(db).rows() == before and time.time() - t0 < 5


@pytest.mark.parametrize("text,message", [
    ('models = ["gmm-flow"]', "sweep.toml: name: Field required"),
    ('name = "x"\nmodels = ["nope"]', "sweep.toml: models: unknown model 'nope'; allowed: "),
    ('name = "x"\nmodels = ["gmm-flow"]\n[[guidance]]\nmethod = "cgf"',
     "sweep.toml: guidance: unknown guidance method 'cgf'; allowed: none, adaptive, apg"),
    ('name = "x"\nmodels = ["gmm-flow"]\n[[guidance]]\nmethod = "cfg"\nscael = 3',
     "sweep.toml: guidance: cfg has no option 'scael' (did you mean 'scale'?)"),
    ('name = "x"\nmodels = ["gmm-flow"]\nmetrics = ["fid"]', "sweep.toml: metrics: unknown metric 'fid'; allowed: "),
    ('name = "x"\nmodels = ["gmm-flow"]\nmetrics = ["fd"]',
     "sweep.toml: metric 'fd' does not apply to model 'gmm-flow'; allowed for it: accuracy, energy"),
    ('name = "x"\nmodels = []', "sweep.toml: models: List should have at least 1 item"),
    ('name = "x"\nmodels = ["gmm-flow"]\n[[guidance]]\nmethod = "cfg"\nscale = []',
     "sweep.toml: guidance: guidance 'cfg': an option has an empty list of values (an empty grid)"),
    ('name = "x"\nmodels = ["gmm-flow"]\nsamples = "many"', "sweep.toml: samples: Input should be a valid integer"),
    ('name = "x"\nmodels = ["gmm-flow"]\nsteps = [0]', "sweep.toml: steps: steps must be integers >= 1, got [0]"),
    ('name = "x"\nmodels = ["gmm-flow"]\nsolvers = ["rk4"]', "sweep.toml: solvers: unknown solver 'rk4'; allowed: "),
    ('name = "x"\nmodels = ["gmm-flow"]\nsteeps = [3]', "sweep.toml: steeps: unknown key; allowed: name, models"),
    ('name = "x"\nmodels = ["gmm-flow"', "sweep.toml: not valid TOML"),
    ('name = "x"\nmodels = ["gmm-flow"]\nsteps = [4]\nnfe = [8]',
     "sweep.toml: steps, nfe: give steps = [...] or nfe = [...] (an NFE budget per sample), not both"),
    ('name = "x"', "sweep.toml: models, claims: give models = [...] (a grid) or [[claims]] entries"),
    ('name = "x"\n[[claims]]\nid = "a"\npaper = "p"\nclaim = "c"\nmodel = "gmm-flow"\nmethod = "none"\n'
     'baseline = "cfg(scale=2)"\nexpect = [{ metric = "energy", relation = "lower" }]\nsolvr = "euler"',
     "sweep.toml: claims[a].solvr: unknown key; allowed: id, paper, claim, model, solver"),
    ('name = "x"\n[[claims]]\nid = "a"\npaper = "p"\nclaim = "c"\nmodel = "gmm-flow"\nmethod = "none"\n'
     'baseline = "cfg(scale=2)"\nexpect = [{ metric = "energy", relation = "smaller" }]',
     "sweep.toml: claims[a].expect.0.relation: Input should be 'lower' or 'higher'"),
    ('name = "x"\n[[claims]]\nid = "a"\npaper = "p"\nclaim = "c"\nmodel = "gmm-flow"\nmethod = "none"\n'
     'baseline = "cfg(scale=2)"\nexpect = [{ metric = "fd", relation = "lower" }]',
     "sweep.toml: metric 'fd' does not apply to model 'gmm-flow'; allowed for it: accuracy, energy"),
])
def test_bad_configs_give_one_line_and_write_nothing(tmp_path, text, message):
    config = write(tmp_path, text)
    db = tmp_path / "bad.sqlite"
    with pytest.raises(ConfigError) as e:
        run(config, db, progress=False)
    assert str(config.parent / message.split(":")[0]) in str(e.value) and message.split(": ", 1)[1] in str(e.value)
    assert "\n" not in str(e.value)
    assert not db.exists()


def test_presets_load():
    for name, n in (("demo", 15), ("guidance-scales", 93), ("solvers", 32), ("claims", 32)):
        sweep, cells = load_sweep(name)
        assert sweep.name == name and len(cells) == n and len({c.key for c in cells}) == n


def test_cli_run_and_status(tmp_path):
    import json

    from typer.testing import CliRunner

    from steer.bench.cli import app

    config = write(tmp_path, SWEEP.replace("[4, 8, 16]", "[4]").replace('"heun", "dpmpp_2m", "unipc"', '"heun"'))
    db = tmp_path / "c.sqlite"
    res = CliRunner().invoke(app, ["run", str(config), "--db", str(db), "--no-progress"])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(app, ["status", "--db", str(db), "--json"])
    assert json.loads(res.output)["done"] == json.loads(res.output)["total"] == 4
    bad = write(tmp_path, 'name = "x"\nmodels = ["nope"]', "bad.toml")
    res = CliRunner().invoke(app, ["run", str(bad), "--db", str(db)])
    assert res.exit_code == 2 and "unknown model 'nope'" in res.output


def test_an_nfe_budget_picks_the_most_steps_that_fit(tmp_path):
    """Heun costs 2 NFE per step but 1 on its last step to σ = 0, CFG doubles it: a budget of 10 is 3 CFG steps
    (2·(2·3 − 1) = 10) or 5 unguided ones (9); dpmpp_2m costs 1 per step."""
    config = write(tmp_path, 'name = "b"\nmodels = ["gmm-flow"]\nsolvers = ["heun", "dpmpp_2m"]\nnfe = [10]\n'
                             'samples = 20\nmetrics = ["accuracy"]\n[[guidance]]\nmethod = "cfg"\nscale = [2]\n'
                             '[[guidance]]\nmethod = "none"\n')
    db = tmp_path / "b.sqlite"
    run(config, db, progress=False)
    got = {(r["config"]["solver"], r["config"]["guidance"]): (r["result"]["steps"], r["result"]["nfe"])
           for r in Store(db).rows()}
    assert got == {("heun", "cfg(scale=2)"): (3, 10), ("heun", "none"): (5, 9), ("dpmpp_2m", "cfg(scale=2)"): (5, 10),
                   ("dpmpp_2m", "none"): (10, 10)}


def test_torchrun_with_two_processes_gives_the_cells_of_one(tmp_path):
    """``torchrun --nproc-per-node 2`` shards the cells over two CPU processes writing to one database; the result
    is the same cells with the same metrics as one process."""
    import shutil

    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    config = write(tmp_path, SWEEP.replace("[4, 8, 16]", "[4, 8]"))
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(steer.__file__)), "OMP_NUM_THREADS": "1"}
    two = tmp_path / "two.sqlite"
    out = subprocess.run([torchrun, "--standalone", "--nproc-per-node", "2", "-m", "steer.bench.run", str(config),
                          "--db", str(two), "--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    one = tmp_path / "one.sqlite"
    run(config, one, progress=False)
    a, b = metrics_by_key(two), metrics_by_key(one)
    assert set(a) == set(b) and len(a) == 16
    for key in a:
        assert a[key][1] == b[key][1] and a[key][0] == pytest.approx(b[key][0], rel=1e-12, abs=1e-15)


def test_a_rank_runs_its_own_cells_whatever_the_others_have_finished(tmp_path, monkeypatch):
    """Rank 1 of 2 starts after rank 0 has finished cell 0: it runs exactly cells 1, 3, 5, … (taking every other
    *remaining* cell, as before, it ran rank 0's cells 2, 4, … and skipped its own)."""
    from steer.bench import runner

    config = write(tmp_path, SWEEP.replace("[4, 8, 16]", "[4, 8]"))
    _, cells = load_sweep(config)
    db = tmp_path / "r.sqlite"
    store = Store(db)
    store.register_sweep("s", [c.key for c in cells])
    store.put(cells[0].key, cells[0].config(), {"metrics": {}, "nfe": 0}, numpy.zeros((1, 2), dtype=numpy.float32))
    store.close()
    ran = []
    monkeypatch.setattr(runner, "run_cell", lambda cell, model, device: (ran.append(cell.key) or ({"metrics": {}},
                                                                        torch.zeros(1, 2))))
    monkeypatch.setattr(runner.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(runner.dist, "barrier", lambda: None)
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    run(config, db, progress=False)
    assert ran == [c.key for c in cells[1::2]]


CLAIMS = """
name = "c"
seeds = [0, 1]
samples = 300

[[claims]]
id = "2m-beats-euler"
paper = "P1"
claim = "dpmpp_2m is more accurate than euler at 4 steps"
model = "gmm-flow"
solver = "dpmpp_2m"
baseline_solver = "euler"
steps = 4
method = "none"
baseline = "none"
expect = [{ metric = "energy", relation = "lower" }]

[[claims]]
id = "euler-beats-2m"
paper = "P2"
claim = "euler is more accurate than dpmpp_2m at 4 steps, and CFG changes no accuracy"
model = "gmm-flow"
solver = "euler"
baseline_solver = "dpmpp_2m"
steps = 4
method = "none"
baseline = "none"
expect = [{ metric = "energy", relation = "lower" }, { metric = "accuracy", relation = "higher", margin = -1 }]
"""


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A digits sweep (two methods at two scales), a mixture sweep and two claims in one database, and its report."""
    from steer.bench.report import write_report

    tmp_path = tmp_path_factory.mktemp("report")
    digits_sweep = write(tmp_path, 'name = "d"\nmodels = ["digits-flow"]\nsteps = [6]\nsamples = 20\n'
                                   'metrics = ["accuracy", "fd", "saturation"]\n[[guidance]]\nmethod = "cfg"\n'
                                   'scale = [2, 4]\n[[guidance]]\nmethod = "apg"\nscale = [2, 4]\n', "d.toml")
    db = tmp_path / "r.sqlite"
    run(digits_sweep, db, progress=False)
    run(write(tmp_path, SWEEP.replace("[4, 8, 16]", "[4]"), "g.toml"), db, progress=False)
    run(write(tmp_path, CLAIMS, "c.toml"), db, progress=False)
    return db, write_report(db, tmp_path / "report")


def test_report_is_a_static_folder_whose_images_and_plots_all_exist(report):
    """The report's HTML parses, every image it names is a PNG in the folder, every plot is well-formed SVG, and
    the page says how to read the metrics."""
    import re
    import xml.etree.ElementTree as ET
    from html.parser import HTMLParser

    _, index = report
    page = index.read_text()

    class Images(HTMLParser):
        srcs = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.srcs.append(dict(attrs)["src"])

    parser = Images()
    parser.feed(page)
    assert len(parser.srcs) == 4  # one grid per digits cell
    for src in parser.srcs:
        assert (index.parent / src).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svgs = re.findall(r"<svg.*?</svg>", page, flags=re.S)
    assert len(svgs) >= 6  # digits: 3 curves + 2 fronts; mixture: fronts and curves
    for svg in svgs:
        ET.fromstring(svg)
    assert "Pareto front" in page and "Fréchet distance" in page and "gmm-flow" in page


def test_claims_table_compares_the_means_over_seeds(report):
    """Each claim's verdict follows from the metrics of its cells in the database, recomputed here: an expectation
    holds when it holds for the means over seeds, and is clear when the difference exceeds two standard errors."""
    import math
    import statistics

    from steer.bench.report import claim_results

    db, index = report
    store = Store(db)
    rows, results = store.rows(), {c["id"]: c for c in claim_results(store)}
    store.close()

    def values(solver, metric):
        return [r["result"]["metrics"][metric] for r in rows if r["config"]["solver"] == solver
                and r["config"].get("steps") == 4 and r["config"]["samples"] == 300]

    e2m, eeu = values("dpmpp_2m", "energy"), values("euler", "energy")
    assert len(e2m) == len(eeu) == 2  # the two claims share their four cells
    lower = statistics.fmean(e2m) < statistics.fmean(eeu)
    clear = abs(statistics.fmean(e2m) - statistics.fmean(eeu)) > 2 * math.sqrt(
        (statistics.variance(e2m) + statistics.variance(eeu)) / 2)

    def verdict(holds):
        return "reproduced" if holds and clear else "not reproduced" if clear else "inconclusive"

    assert results["2m-beats-euler"]["verdict"] == verdict(lower)
    checks = results["euler-beats-2m"]["checks"]
    assert [(c["holds"], c["clear"]) for c in checks] == [(not lower, clear), (True, True)]
    assert statistics.fmean(checks[0]["method"]) == pytest.approx(statistics.fmean(eeu))
    assert results["euler-beats-2m"]["verdict"] == verdict(not lower)
    page = index.read_text()
    marks = ("✓ reproduced", "✗ not reproduced", "~ within noise")
    assert "Paper claims" in page and sum(page.count(m) for m in marks) == 2


def test_report_loads_in_headless_chromium(report, tmp_path):
    """Chromium opens the report from disk (no server, no network): every image and inline plot rendered, no
    console message; a screenshot is saved. A page with a missing image is caught by the same check."""
    import shutil

    from steer.bench.browser import check_page, find_chromium, screenshot

    if find_chromium() is None:
        if os.environ.get("STEER_REQUIRE_BROWSER"):
            pytest.fail("chromium is missing although the Makefile's test set-up installs it")
        pytest.skip("no chromium (make test installs it)")
    _, index = report
    got = check_page(index)
    assert got["ok"] and got["images"] == 4 and got["plots"] >= 6 and got["console"] == [], got
    png = screenshot(index, tmp_path / "report.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    broken = tmp_path / "broken"
    shutil.copytree(index.parent, broken)
    next((broken / "grids").iterdir()).unlink()
    got = check_page(broken / "index.html")
    assert not got["ok"] and got["broken"] == 1

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


def test_version():
    import steer

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output == f"steer {steer.__version__}\n" == "steer 0.1.0\n"


def test_help_has_no_bool_placeholders():
    for args in ([], ["sample"], ["methods"], ["solvers"], ["testbed"], ["testbed", "train"]):
        res = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "80"})
        assert res.exit_code == 0, res.output
        assert "<bool>" not in res.output and "--help" in res.output, args
    res = runner.invoke(app, ["sample", "--help"], env={"COLUMNS": "80"})
    assert "--compare-solvers" in res.output and "digits-eps" in res.output and "1000 for gmm" in res.output
    res = runner.invoke(app, ["methods", "--help"], env={"COLUMNS": "80"})
    assert "--json" in res.output and "JSON" in res.output and "--long" in res.output


def _lines_at_80(args):
    res = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines and max(map(len, lines)) <= 80, max(lines, key=len)
    return lines


def test_solvers_one_line_each_at_80_columns():
    lines = _lines_at_80(["solvers"])
    rows = {line[2:].split()[0]: line for line in lines if line[2:].split() and line[2:].split()[0] in SOLVERS}
    assert list(rows) == list(SOLVERS)
    assert [line.split()[1] for line in lines if line.startswith("*")] == ["dpmpp_2m"]
    assert rows["dpmpp_3m"].split()[1:] == ["3", "ODE", "1", "2211.01095"]
    assert rows["heun"].split()[1:] == ["2", "ODE", "2", "2206.00364"]
    long = _lines_at_80(["solvers", "--long"])
    assert any("(the default)" in line and line.startswith("dpmpp_2m") for line in long)
    assert not any(line.rstrip().endswith("arXiv") for line in long)  # "arXiv <id>" is never split
    assert any("intervals=[(3, 2, 0.06, 0.3)]" in line for line in long)  # a value with spaces kept on one line


def test_methods_one_line_each_at_80_columns():
    from steer.guidance import REGISTRY

    lines = _lines_at_80(["methods"])
    rows = {line.split()[0]: line.split() for line in lines if line.startswith("  ") and line.split()[0] in REGISTRY}
    assert list(rows) == list(REGISTRY)
    assert rows["apg"] == ["apg", "cfg", "+1", "2410.02416", "scale=10.0"]
    assert rows["perp_neg"][2] == "+2…" and rows["pag"][1] == "perturbation"
    for args in (["methods", "--long"], ["methods", "cfg"]):
        text = _lines_at_80(args)
        assert any("sigma_hi=inf" in line for line in text)
        assert all("sigma_hi=inf" in line or "sigma_hi=297.0" in line for line in text if "sigma_hi" in line)  # slg
        assert not any(line.rstrip().endswith("arXiv") for line in text)
    cfg = "\n".join(_lines_at_80(["methods", "cfg"]))
    assert cfg.startswith("cfg (cfg)") and "arXiv 2207.12598" in cfg and "source of the defaults" in cfg
    assert "apg" not in cfg
    res = runner.invoke(app, ["methods", "cfg", "--json"])
    assert [r["name"] for r in json.loads(res.output)] == ["cfg"]
    res = runner.invoke(app, ["methods", "cfgg"])
    assert _one_line_error(res, 2) == "error: unknown guidance method 'cfgg'; see `steer methods`"


def test_compare_solvers_refuses_the_options_it_ignores(tmp_path):
    for extra, named in ((["--guidance", "cfg(3)"], "--guidance"), (["--solver", "heun"], "--solver"),
                         (["--steps", "4", "--out", str(tmp_path / "x.npy")], "--steps, --out")):
        res = runner.invoke(app, ["sample", "--compare-solvers", "--n", "4", *extra])
        assert _one_line_error(res, 2) == ("error: --compare-solvers compares every solver at its own step counts "
                                           f"without guidance; it does not take {named}")
    assert not (tmp_path / "x.npy").exists()
    res = runner.invoke(app, ["sample", "--compare-solvers", "--model", "digits"])
    assert "only the gmm model" in _one_line_error(res, 2)


def test_digits_refuse_gmm_options_and_gmm_refuses_png(tmp_path):
    res = runner.invoke(app, ["sample", "--model", "digits", "--path", "vp-linear"])
    assert _one_line_error(res, 2).startswith("error: --path set the gmm model")
    res = runner.invoke(app, ["sample", "--model", "digits-eps", "--dim", "3"])
    assert _one_line_error(res, 2).startswith("error: --dim set the gmm model")
    res = runner.invoke(app, ["sample", "--n", "4", "--out", str(tmp_path / "g.png")])
    assert "image grid" in _one_line_error(res, 2) and not (tmp_path / "g.png").exists()


def test_gmm_metrics_are_explained():
    res = runner.invoke(app, ["sample", "--n", "40", "--steps", "4"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "energy distance: to 40 exact samples" in res.output and "slightly negative" in res.output
    assert "mean log p(c|x): " in res.output and "NFE/sample: " in res.output


def test_sample_digits_writes_a_labelled_png_grid(tmp_path):
    from PIL import Image

    from steer import images

    out = tmp_path / "grid.png"
    res = runner.invoke(app, ["sample", "--model", "digits", "--n", "100", "--steps", "4", "--guidance", "cfg(3)",
                              "--out", str(out)], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    assert "class accuracy: " in res.output and "out of [-1, 1]: " in res.output and "NFE/sample: " in res.output
    assert "mean excess: " in res.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # 10 rows (labels) x 10 columns of 8x8 digits at 8 pixels per pixel, 2-pixel gaps; the row labels to the left,
    # two text lines (title, legend) above, 6-pixel margins
    grid_h = grid_w = 10 * 64 + 9 * 2
    assert (grid_h, grid_w) == (658, 658)
    with Image.open(out) as img:
        assert img.format == "PNG" and img.mode == "RGB"
        assert img.size == (24 + grid_w + 6, 6 + 2 * 14 + 6 + grid_h + 6)
    assert images.LEGEND.startswith("grey: [-1, 1]")
    res = runner.invoke(app, ["sample", "--model", "digits-eps", "--n", "10", "--steps", "2",
                              "--out", str(tmp_path / "x.npy")])
    assert res.exit_code == 0, res.output
    assert np.load(tmp_path / "x.npy").shape == (10, 1, 8, 8)


def test_colorize_marks_values_beyond_the_range():
    from steer.images import colorize

    x = np.array([[-1.0, 0.0, 1.0, 1.25, 3.0, -1.2, -5.0]])
    # grey (x + 1)/2 inside [-1, 1]; beyond it the tint min(excess / 0.5, 1): red from white above, blue from black
    # below
    expected = [(0, 0, 0), (128, 128, 128), (255, 255, 255), (255, 128, 128), (255, 0, 0), (0, 0, 102), (0, 0, 255)]
    assert colorize(x).dtype == np.uint8 and colorize(x)[0].tolist() == [list(c) for c in expected]


def test_grid_rows_are_labels_and_the_bare_png_decodes(tmp_path, monkeypatch):
    import builtins

    from PIL import Image

    from steer.images import colorize, grid, write_grid

    imgs = np.stack([np.full((2, 3), v) for v in (0.0, -1.0, 2.0)])
    tiles, rows = grid(imgs, np.array([1, 0, 1]), scale=1, gap=1)
    assert rows == [0, 1] and tiles.shape == (2 * 2 + 1, 2 * 3 + 1, 3)
    assert (tiles[0:2, 0:3] == colorize(imgs[1])).all()  # label 0, its only sample
    assert (tiles[0:2, 4:7] == 255).all()  # label 0 has no second sample: blank
    assert (tiles[3:5, 0:3] == colorize(imgs[0])).all() and (tiles[3:5, 4:7] == [255, 0, 0]).all()

    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    assert write_grid(tmp_path / "bare.png", imgs, np.array([1, 0, 1]), title="t") == (2 * 24 + 2, 2 * 16 + 2)
    monkeypatch.undo()
    with Image.open(tmp_path / "bare.png") as img:
        assert img.size == (50, 34)
        assert (np.asarray(img.convert("RGB")) == grid(imgs, np.array([1, 0, 1]))[0]).all()


def test_demo_prints_a_table_and_writes_a_report(tmp_path):
    """``steer demo`` on a two-cell digits sweep (the real preset takes about 1.5 minutes on 2 cores)."""
    config = tmp_path / "tiny.toml"
    config.write_text('name = "tiny"\nmodels = ["digits-flow"]\nnfe = [8]\nsamples = 10\n'
                      'metrics = ["accuracy", "fd", "saturation"]\n[[guidance]]\nmethod = "none"\n'
                      '[[guidance]]\nmethod = "apg"\nscale = [3]\n')
    res = runner.invoke(app, ["demo", "--out", str(tmp_path / "rep"), "--no-progress", "--config", str(config)],
                        env={"COLUMNS": "120"})
    assert res.exit_code == 0, res.output
    assert "apg(scale=3)" in res.output and "none" in res.output and "Fréchet distance" in res.output
    assert (tmp_path / "rep" / "index.html").exists() and (tmp_path / "rep" / "results.sqlite").exists()
    bad = runner.invoke(app, ["demo", "--out", str(tmp_path / "rep2"), "--config", "nope"])
    assert bad.exit_code == 2 and "not a preset" in bad.output

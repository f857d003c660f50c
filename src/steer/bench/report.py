"""A static HTML report of a results database: one folder, no network at view time.

For each group of cells that share a model, a solver and a step count (or NFE budget): a table of every cell
(mean ± std over seeds), metric-versus-scale curves (one line per method with its other options), Pareto fronts
(each metric against accuracy, the front drawn), a table of methods at matched NFE, and the sample grid of each
cell's first seed (image models; pixels beyond the data range in colour). Plots are inline SVG written here.
"""

from __future__ import annotations

import html
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path

from ..spec import parse_spec
from .metrics import METRICS, family, labels_for
from .store import Store

__all__ = ["write_report", "claim_results", "claims_markdown"]

COLOURS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#7f7f7f",
           "#bcbd22"]
LOWER_IS_BETTER = {"fd", "saturation", "energy"}
SCALE_FORM = {"cfgpp": "λ, not w"}  # methods whose scale is not the w-form guidance scale


def _method_and_scale(spec: str) -> tuple[str, float | None]:
    """``"apg(scale=5, eta=0)"`` -> ``("apg(eta=0)", 5.0)``: the line a cell belongs to and its x coordinate."""
    if spec == "none":
        return "none", 1.0
    name, args, kwargs = parse_spec(spec)
    scale = kwargs.pop("scale", args[0] if args else None)
    rest = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"{name}({rest})" if rest else name, None if scale is None else float(scale)


def _group_cells(rows: list[dict]) -> dict:
    """(model, solver, steps or nfe) -> guidance spec -> {"metrics": {name: [per seed]}, "nfe": [...], row}"""
    groups: dict = defaultdict(lambda: defaultdict(lambda: {"metrics": defaultdict(list), "nfe": [], "rows": []}))
    for r in rows:
        c = r["config"]
        budget = f"{c['steps']} steps" if "steps" in c else f"NFE ≤ {c['nfe']}"
        cell = groups[(c["model"], c["solver"], budget)][c["guidance"]]
        for k, v in r["result"]["metrics"].items():
            cell["metrics"][k].append(v)
        cell["nfe"].append(r["result"]["nfe"])
        cell["rows"].append(r)
    return groups


def _fmt(values: list[float]) -> str:
    if not values:
        return ""
    m = statistics.fmean(values)
    return f"{m:.4g}" if len(values) == 1 else f"{m:.4g} ± {statistics.stdev(values):.2g}"


class _Axes:
    """A small SVG plot: linear axes fitted to the data with round ticks, labels, a legend to the right."""

    W, H, L, R, T, B = 400, 280, 56, 12, 24, 40

    def __init__(self, xs, ys, title, xlabel, ylabel, legend: int = 0):
        self.x0, self.x1 = self._span(xs)
        self.y0, self.y1 = self._span(ys)
        self.legend = legend  # width of the legend column, 0 for none
        width = self.W + legend
        self.parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{self.H}" '
                      f'viewBox="0 0 {width} {self.H}" font-family="sans-serif" font-size="11">',
                      f'<text x="{self.W / 2}" y="14" text-anchor="middle" font-weight="bold">{html.escape(title)}'
                      '</text>',
                      f'<rect x="{self.L}" y="{self.T}" width="{self.W - self.L - self.R}" '
                      f'height="{self.H - self.T - self.B}" fill="none" stroke="#999"/>',
                      f'<text x="{self.W / 2}" y="{self.H - 6}" text-anchor="middle">{html.escape(xlabel)}</text>',
                      f'<text x="12" y="{self.H / 2}" text-anchor="middle" transform="rotate(-90 12 {self.H / 2})">'
                      f'{html.escape(ylabel)}</text>']
        for fx in self._ticks(self.x0, self.x1):
            self.parts.append(f'<text x="{self.px(fx):.1f}" y="{self.H - self.B + 14}" text-anchor="middle">'
                              f'{fx:.4g}</text>')
        for fy in self._ticks(self.y0, self.y1):
            self.parts.append(f'<text x="{self.L - 4}" y="{self.py(fy) + 4:.1f}" text-anchor="end">{fy:.4g}</text>')

    @staticmethod
    def _span(values):
        lo, hi = min(values), max(values)
        pad = (hi - lo) * 0.08 or max(abs(lo) * 0.1, 1e-3)
        return lo - pad, hi + pad

    @staticmethod
    def _ticks(lo, hi, n=4):
        """Round tick values (1, 2 or 5 times a power of ten apart) inside [lo, hi]."""
        raw = (hi - lo) / n
        step = min((m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)), key=lambda s: abs(s - raw))
        first = math.ceil(lo / step)
        return [k * step for k in range(first, math.floor(hi / step) + 1)]

    def px(self, x):
        return self.L + (x - self.x0) / (self.x1 - self.x0) * (self.W - self.L - self.R)

    def py(self, y):
        return self.H - self.B - (y - self.y0) / (self.y1 - self.y0) * (self.H - self.T - self.B)

    def line(self, pts, colour, label, index):
        path = " ".join(f"{self.px(x):.1f},{self.py(y):.1f}" for x, y in pts)
        self.parts.append(f'<polyline points="{path}" fill="none" stroke="{colour}" stroke-width="1.5"/>')
        self.points(pts, colour)
        x, y = (self.W + 4, self.T + 10 + 13 * index) if self.legend else (self.L + 6, self.T + 14 + 13 * index)
        self.parts.append(f'<text x="{x}" y="{y}" fill="{colour}">{html.escape(label)}</text>')

    def points(self, pts, colour, labels=None):
        for j, (x, y) in enumerate(pts):
            self.parts.append(f'<circle cx="{self.px(x):.1f}" cy="{self.py(y):.1f}" r="3" fill="{colour}">'
                              f'<title>{html.escape(labels[j]) if labels else f"{x:.3g}, {y:.3g}"}</title></circle>')

    def svg(self) -> str:
        return "\n".join(self.parts + ["</svg>"])


def _pareto(points: list[tuple[float, float]], lower: bool) -> list[tuple[float, float]]:
    """The points not dominated in (accuracy higher, the other metric lower or higher), sorted by accuracy."""
    better = (lambda a, b: a <= b) if lower else (lambda a, b: a >= b)
    front = [p for p in points if not any(q != p and q[0] >= p[0] and better(q[1], p[1]) for q in points)]
    return sorted(set(front))


def _curves(cells: dict, metric: str) -> str | None:
    lines: dict = defaultdict(list)
    for spec, c in cells.items():
        method, scale = _method_and_scale(spec)
        if scale is not None and c["metrics"].get(metric):
            lines[method].append((scale, statistics.fmean(c["metrics"][metric])))
    lines = {k: sorted(v) for k, v in lines.items() if k != "none"}
    if not lines:
        return None
    pts = [p for v in lines.values() for p in v]
    labels = {m: m + (f" (x: {SCALE_FORM[m.split('(')[0]]})" if m.split("(")[0] in SCALE_FORM else "")
              for m in lines}
    ax = _Axes([p[0] for p in pts], [p[1] for p in pts], f"{metric} vs guidance scale", "scale (w-form)", metric,
               legend=max(60, 7 * max(map(len, labels.values()))))
    for i, (method, v) in enumerate(sorted(lines.items())):
        ax.line(v, COLOURS[i % len(COLOURS)], labels[method], i)
    return ax.svg()


def _front(cells: dict, metric: str) -> str | None:
    pts, labels = [], []
    for spec, c in cells.items():
        if c["metrics"].get("accuracy") and c["metrics"].get(metric):
            pts.append((statistics.fmean(c["metrics"]["accuracy"]), statistics.fmean(c["metrics"][metric])))
            labels.append(spec)
    if len(pts) < 2:
        return None
    lower = metric in LOWER_IS_BETTER
    ax = _Axes([p[0] for p in pts], [p[1] for p in pts], f"{metric} vs accuracy: the best trade-offs",
               "accuracy (higher is better)", f"{metric} ({'lower' if lower else 'higher'} is better)", legend=90)
    ax.points(pts, "#777", labels)
    front = _pareto(pts, lower)
    ax.line(front, "#d62728", "Pareto front", 0)
    return ax.svg()


def _grid(out: Path, store: Store, key: str, row: dict) -> str | None:
    from ..images import write_grid

    c = row["config"]
    if family(c["model"]) != "digits":
        return None
    x = store.samples(row["samples"])
    labels = labels_for(c["model"], len(x)).numpy()
    name = f"grids/{key}.png"
    (out / "grids").mkdir(parents=True, exist_ok=True)
    title = f"{c['model']} · {c['solver']} · {c.get('steps', c.get('nfe'))} · {c['guidance']} · seed {c['seed']}"
    write_grid(out / name, x[:, 0], labels, title=title)
    return name


def claim_results(store: Store) -> list[dict]:
    """Each registered claim with, per expectation, the method's and the baseline's metric over seeds and whether
    the expectation holds and whether it is clear of seed noise (the mean difference beyond the margin exceeds two
    standard errors); ``verdict`` is "reproduced" (every expectation holds clearly), "not reproduced" (one fails
    clearly), "inconclusive" (otherwise) or "incomplete" (cells missing)."""
    from .config import Expect

    rows = {r["key"]: r for r in store.rows()}
    out = []
    for claim in store.claims():
        have = [[rows[k] for k in claim[side] if k in rows] for side in ("method_keys", "baseline_keys")]
        checks = []
        if all(len(h) == len(claim[side]) for h, side in zip(have, ("method_keys", "baseline_keys"))):
            for e in claim["expect"]:
                m, b = ([r["result"]["metrics"][e["metric"]] for r in h] for h in have)
                excess = (statistics.fmean(b) - statistics.fmean(m) if e["relation"] == "lower"
                          else statistics.fmean(m) - statistics.fmean(b)) - e["margin"]
                se = (math.sqrt(statistics.variance(m) / len(m) + statistics.variance(b) / len(b))
                      if min(len(m), len(b)) > 1 else 0.0)
                checks.append({**e, "method": m, "baseline": b,
                               "holds": Expect(**e).holds(statistics.fmean(m), statistics.fmean(b)),
                               "clear": abs(excess) > 2 * se})
        verdict = ("incomplete" if not checks
                   else "reproduced" if all(c["holds"] and c["clear"] for c in checks)
                   else "not reproduced" if any(not c["holds"] and c["clear"] for c in checks)
                   else "inconclusive")
        nfe = [statistics.fmean(r["result"]["nfe"] for r in h) if h else None for h in have]
        out.append({**claim, "checks": checks, "verdict": verdict, "nfe_used": nfe})
    return out


def _claims_table(results: list[dict]) -> str:
    mark = {"reproduced": "✓ reproduced", "not reproduced": "✗ not reproduced", "inconclusive": "~ within noise",
            "incomplete": "… incomplete"}
    body = ["<h2>Paper claims</h2><p>Each claim compared on a testbed: the method against a baseline (means over "
            "seeds ± standard deviation). A claim is reproduced here when every expectation holds by more than two "
            "standard errors of the difference; within that it is called within noise.</p>",
            "<table><tr><th>paper</th><th>claim</th><th>testbed</th><th>method vs baseline (NFE / sample)</th>"
            "<th>expected</th><th>measured: method · baseline</th><th>verdict</th></tr>"]
    for c in results:
        budget = f"{c['steps']} steps" if c.get("steps") else f"NFE ≤ {c['nfe']}"
        solver = c["solver"] + (f" / {c['baseline_solver']}" if c.get("baseline_solver") else "")
        nfe = " · ".join("–" if n is None else f"{n:.0f}" for n in c["nfe_used"])
        expected = "<br>".join(f"{e['metric']} {e['relation']}" + (f" by {e['margin']:g}" if e["margin"] > 0 else
                                                                 f" (slack {-e['margin']:g})" if e["margin"] else "")
                               for e in c["expect"])
        measured = "<br>".join(f"{'~' if not k['clear'] else '✓' if k['holds'] else '✗'} {k['metric']}: "
                               f"{_fmt(k['method'])} · {_fmt(k['baseline'])}" for k in c["checks"]) or "–"
        body.append(f'<tr class="{c["verdict"].replace(" ", "-")}"><td>{html.escape(c["paper"])}</td>'
                    f"<td>{html.escape(c['claim'])}</td><td>{html.escape(c['model'])} · {html.escape(solver)} · "
                    f"{budget}</td><td><code>{html.escape(c['method'])}</code> vs <code>"
                    f"{html.escape(c['baseline'])}</code> ({nfe})</td><td>{expected}</td><td>{measured}</td>"
                    f"<td>{mark[c['verdict']]}</td></tr>")
    return "\n".join(body + ["</table>"])


def claims_markdown(results: list[dict]) -> str:
    """The claims table as Markdown (written beside the report as ``claims.md``)."""
    mark = {"reproduced": "✓ reproduced", "not reproduced": "✗ not reproduced", "inconclusive": "~ within noise",
            "incomplete": "… incomplete"}
    lines = ["| claim (paper) | testbed | method vs baseline | measured: method · baseline | verdict |",
             "|---|---|---|---|---|"]
    for c in results:
        budget = f"{c['steps']} steps" if c.get("steps") else f"NFE ≤ {c['nfe']}"
        solver = c["solver"] + (f" / {c['baseline_solver']}" if c.get("baseline_solver") else "")
        measured = "; ".join(f"{k['metric']} {_fmt(k['method'])} · {_fmt(k['baseline'])}" for k in c["checks"])
        lines.append(f"| {c['claim']} ({c['paper']}) | {c['model']}, {solver}, {budget} | `{c['method']}` vs "
                     f"`{c['baseline']}` | {measured or '–'} | {mark[c['verdict']]} |")
    return "\n".join(lines) + "\n"


def write_report(db: "str | Path", out: "str | Path") -> Path:
    """Write ``out/index.html`` (and ``out/grids/*.png``) from the database ``db``; returns the index's path."""
    store = Store(db)
    rows = store.rows()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    body = [f"<h1>steer benchmark report</h1><p>{len(rows)} cells from <code>{html.escape(str(db))}</code>. "
            "Values are means over seeds (± standard deviation where there are several). Metrics:</p><ul>"]
    present = {k for r in rows for k in r["result"]["metrics"]}
    body += [f"<li><b>{k}</b>: {html.escape(v[1])}</li>" for k, v in METRICS.items() if k in present] + ["</ul>"]
    claims = claim_results(store)
    if claims:
        body.append(_claims_table(claims))
        (out / "claims.md").write_text(claims_markdown(claims))
    for (model, solver, budget), cells in sorted(_group_cells(rows).items()):
        names = sorted({k for c in cells.values() for k in c["metrics"]})
        body.append(f"<h2>{html.escape(model)} · {html.escape(solver)} · {html.escape(budget)}</h2>")
        body.append("<table><tr><th>guidance</th><th>NFE / sample</th>" + "".join(f"<th>{n}</th>" for n in names)
                    + "</tr>")
        for spec, c in sorted(cells.items()):
            body.append(f"<tr><td><code>{html.escape(spec)}</code></td><td>{_fmt(c['nfe'])}</td>"
                        + "".join(f"<td>{_fmt(c['metrics'].get(n, []))}</td>" for n in names) + "</tr>")
        body.append("</table>")
        plots = [_curves(cells, n) for n in names] + [_front(cells, n) for n in names if n != "accuracy"]
        body.append('<div class="plots">' + "".join(p for p in plots if p) + "</div>")
        by_nfe: dict = defaultdict(list)
        for spec, c in cells.items():
            by_nfe[round(statistics.fmean(c["nfe"]))].append(spec)
        if len(by_nfe) > 1:
            body.append("<h3>At matched NFE</h3><table><tr><th>NFE / sample</th><th>methods</th></tr>")
            body += [f"<tr><td>{n}</td><td>{', '.join(f'<code>{html.escape(s)}</code>' for s in sorted(v))}</td></tr>"
                     for n, v in sorted(by_nfe.items())]
            body.append("</table>")
        grids = []
        for spec, c in sorted(cells.items()):
            first = min(c["rows"], key=lambda r: r["config"]["seed"])
            name = _grid(out, store, first["key"], first)
            if name:
                grids.append(f'<figure><img src="{name}" alt="{html.escape(spec)}">'
                             f"<figcaption>{html.escape(spec)}</figcaption></figure>")
        if grids:
            body.append('<h3>Samples (first seed; red above / blue below the data range)</h3><div class="grids">'
                        + "".join(grids) + "</div>")
    store.close()
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>steer benchmark report</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1400px; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 3px 8px; }}
.plots, .grids {{ display: flex; flex-wrap: wrap; gap: 12px; }} figure {{ margin: 0; }}
figcaption {{ font-size: 12px; text-align: center; }}
tr.reproduced td:last-child {{ background: #e3f4e1; }} tr.not-reproduced td:last-child {{ background: #fbe3e0; }}
tr.inconclusive td:last-child {{ background: #f4f1dc; }}
</style></head>
<body>
{chr(10).join(body)}
<script>
window.addEventListener("load", () => {{  // read by steer.bench.browser.check_page
  const images = [...document.images], plots = [...document.querySelectorAll("svg")];
  const broken = images.filter(im => !(im.complete && im.naturalWidth > 0)).length
    + plots.filter(p => !(p.getBBox().width > 0)).length;
  document.body.dataset.check = `${{broken ? "broken" : "ok"}} images=${{images.length}} plots=${{plots.length}} `
    + `broken=${{broken}}`;
}});
</script>
</body></html>
"""
    index = out / "index.html"
    tmp = out / "index.html.tmp"
    tmp.write_text(page)
    os.replace(tmp, index)  # a failure leaves the previous report whole
    return index

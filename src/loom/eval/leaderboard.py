"""``loom leaderboard BENCHMARK``: a benchmark's table built from its MLflow runs, printed and logged.

Rows are the finished evaluation runs (tag ``loom.kind=eval``) of the benchmark's experiment (``bench/<name>``):
by default the newest run per model (``--all``: every run), sorted by the first column that has values, best
first. Columns are the paper's, in its order (:data:`loom.eval.benchmarks.BENCHMARKS`), each with its direction
(↑ higher is better, ↓ lower is better), then the item count, the feature networks and the run.

The best value of each column is marked: ``*`` in the text table, bold in markdown and HTML (``<strong>`` in a
``<td class="best">``). Runs made with the tiny random feature networks (``features=tiny-random``) are not
comparable with real ones: they are labelled, and the best is marked separately among them and among the others.

Logging: the leaderboard becomes the description of the benchmark's experiment (the experiment tag
``mlflow.note.content``, markdown), which the MLflow UI shows at the top of the experiment's pages, above the runs.
The UI shows a description folded to its first lines until it is opened, so it starts with the standings in one
paragraph (:func:`summary`: the leading models with their values), then the full table, each row linked to its
evaluation run. Every ``loom leaderboard`` rewrites it, with the experiment tags ``loom.leaderboard.updated`` and
``loom.leaderboard.rows``. ``--out`` also keeps ``leaderboard.md`` and ``leaderboard.html`` as files. (Earlier
versions logged the tables as artifacts of a run named ``leaderboard``, listed among the models; such a run is
never a row.)
"""

from __future__ import annotations

import html
import math
import os
import time
from dataclasses import dataclass, field

from loom.eval.benchmarks import BENCHMARKS, Benchmark, Column

# MLflow's limit on an experiment tag's value (mlflow/utils/validation.py MAX_EXPERIMENT_TAG_VAL_LENGTH)
MAX_DESCRIPTION_CHARS = 20000


@dataclass
class Row:
    model: str
    run_name: str
    run_id: str
    start_time: int
    features: str
    items: int | None
    values: dict[str, float | None]
    best: set[str] = field(default_factory=set)  # metrics where this row is (one of) the best

    @property
    def tiny(self) -> bool:
        return self.features == "tiny-random"


@dataclass
class Board:
    benchmark: Benchmark
    uri: str
    experiment: str
    rows: list[Row]
    experiment_id: str = ""

    @property
    def columns(self) -> tuple[Column, ...]:
        return self.benchmark.columns


def _finite(v) -> float | None:
    return float(v) if v is not None and math.isfinite(v) else None


def collect(uri: str, benchmark: str, experiment: str | None = None, all_runs: bool = False) -> Board:
    """The benchmark's rows from the tracking store at ``uri``, sorted, with the best values marked."""
    import mlflow

    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r}; known: {sorted(BENCHMARKS)}")
    bench = BENCHMARKS[benchmark]
    experiment = experiment or bench.experiment
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise ValueError(f"no MLflow experiment {experiment!r} in {uri}: run `loom eval {benchmark}` first (with "
                         "the same tracking URI)")
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  order_by=["attributes.start_time DESC"], max_results=1000, page_token=token)
        runs += list(page)
        token = page.token
        if not token:
            break
    rows, seen = [], set()
    for r in runs:
        tags = r.data.tags
        if tags.get("loom.kind") != "eval" or tags.get("loom.benchmark", benchmark) != benchmark:
            continue
        model = r.data.params.get("model") or tags.get("loom.model") or r.info.run_name
        if not all_runs:
            if model in seen:
                continue
            seen.add(model)
        items = r.data.metrics.get("items")
        rows.append(Row(model=model, run_name=r.info.run_name, run_id=r.info.run_id, start_time=r.info.start_time,
                        features=r.data.params.get("features", "-"), items=int(items) if items is not None else None,
                        values={c.metric: _finite(r.data.metrics.get(c.metric)) for c in bench.columns}))  # fmt: skip
    board = Board(bench, uri, experiment, rows, exp.experiment_id)
    mark_best(board)
    _sort(board)
    return board


def mark_best(board: Board) -> None:
    """Mark, per column and separately among tiny-random rows and the others, the best value (ties all marked)."""
    for row in board.rows:
        row.best.clear()
    for c in board.columns:
        for group in (True, False):
            vals = [(r, r.values[c.metric]) for r in board.rows if r.tiny == group and r.values[c.metric] is not None]
            if not vals:
                continue
            best = (max if c.higher_is_better else min)(v for _, v in vals)
            for r, v in vals:
                if v == best:
                    r.best.add(c.metric)


def _sort(board: Board) -> None:
    for c in board.columns:
        if any(r.values[c.metric] is not None for r in board.rows):
            sign = -1.0 if c.higher_is_better else 1.0
            board.rows.sort(key=lambda r: (r.tiny, r.values[c.metric] is None,
                                           sign * (r.values[c.metric] or 0.0), -r.start_time))  # fmt: skip
            return


def _fmt(c: Column, v: float | None) -> str:
    return "-" if v is None else f"{v * c.scale:.{c.digits}f}"


def _cells(board: Board, row: Row, links: bool = False) -> list[tuple[str, bool]]:
    """(text, is best) per displayed column: model, metrics..., items, features, run (``links``: a markdown link to
    the run's page in the MLflow UI)."""
    from loom.platform.tracking import run_link

    run = f"{row.run_name} ({row.run_id[:8]})"
    if links and board.experiment_id:
        run = f"[{run}]({run_link(row.run_id, board.experiment_id)})"
    out = [(row.model, False)]
    out += [(_fmt(c, row.values[c.metric]), c.metric in row.best) for c in board.columns]
    out += [("-" if row.items is None else str(row.items), False), (row.features, False), (run, False)]
    return out


def _header(board: Board) -> list[str]:
    return ["Model"] + [f"{c.label} {c.arrow}" for c in board.columns] + ["items", "features", "run"]


def _legend(board: Board) -> list[str]:
    lines = [f"{board.benchmark.title}.", "↑ higher is better, ↓ lower is better; the best value of each column is "
             "marked."]
    if any(r.tiny for r in board.rows):
        lines.append("Rows with features=tiny-random used random stand-in feature networks: their network-based "
                     "metrics are not comparable with real ones; the best is marked separately among them.")
    return lines


def to_text(board: Board) -> str:
    head = _header(board)
    body = [[t + ("*" if best else "") for t, best in _cells(board, r)] for r in board.rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    lines = [f"{board.experiment} leaderboard ({board.uri}): {len(board.rows)} run(s)"]
    lines += ["  ".join(x[i].ljust(widths[i]) for i in range(len(head))).rstrip() for x in [head] + body]
    lines += [" ".join(_legend(board)).replace("marked.", "marked with *.")]
    return "\n".join(lines)


def to_markdown(board: Board, links: bool = False, max_chars: int | None = None) -> str:
    """The table in markdown, best values in bold. ``links``: each run cell links to the run's page in the MLflow
    UI (for the experiment's description). ``max_chars``: rows past that length are left out, and their count
    said."""
    head = _header(board)
    top = [f"# {board.experiment} leaderboard", "", " ".join(_legend(board)).replace("marked.", "in bold."), "",
           "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]  # fmt: skip
    rows = ["| " + " | ".join((f"**{t}**" if best else t).replace("|", "\\|") for t, best in _cells(board, r, links))
            + " |" for r in board.rows]  # fmt: skip
    tail = ["", f"MLflow: {board.uri}, experiment `{board.experiment}`; updated "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} by `loom leaderboard {board.benchmark.name}`."]  # fmt: skip
    kept = rows
    if max_chars is not None:
        budget = max_chars - len("\n".join(top + tail)) - 200  # room for the line that counts what is left out
        kept = []
        for r in rows:
            if budget - len(r) - 1 < 0:
                break
            kept.append(r)
            budget -= len(r) + 1
    if len(kept) < len(rows):
        tail.insert(1, f"{len(rows) - len(kept)} more row(s) do not fit here: `loom leaderboard "
                       f"{board.benchmark.name}` prints them all.")
    return "\n".join(top + kept + tail) + "\n"


def summary(board: Board, leaders: int = 3) -> str:
    """One markdown paragraph with the standings: the first ``leaders`` rows with every column's value, best first
    (what the MLflow UI shows of the experiment's description before it is opened)."""
    if not board.rows:
        return f"**Leaderboard** of {board.benchmark.title}: no finished evaluation yet."
    mixed = len({r.tiny for r in board.rows}) > 1  # else one remark for all rows, after the standings
    parts = []
    for i, r in enumerate(board.rows[:leaders], 1):
        vals = ", ".join(f"{c.label} {c.arrow} " + (f"**{_fmt(c, r.values[c.metric])}**" if c.metric in r.best
                                                   else _fmt(c, r.values[c.metric])) for c in board.columns)
        parts.append(f"{i}. **{r.model}**: {vals}" + (" (tiny-random features)" if mixed and r.tiny else ""))
    rest = len(board.rows) - len(parts)
    more = f"; {rest} more in the table below" if rest > 0 else "; the table below"
    tiny = (" All rows used tiny-random feature networks: smoke-test numbers."
            if board.rows[0].tiny and not mixed else "")
    return "**Leaderboard** (best first): " + "; ".join(parts) + more + "." + tiny


def description(board: Board) -> str:
    """The experiment's description: :func:`summary`, then the markdown table with each run linked, within
    MLflow's limit on an experiment tag."""
    head = summary(board) + "\n\n"
    return head + to_markdown(board, links=True, max_chars=MAX_DESCRIPTION_CHARS - len(head))


def to_html(board: Board) -> str:
    e = html.escape
    head = "".join(f"<th>{e(h)}</th>" for h in _header(board))
    body = []
    for r in board.rows:
        cells = "".join(f'<td class="best"><strong>{e(t)}</strong></td>' if best else f"<td>{e(t)}</td>"
                        for t, best in _cells(board, r))  # fmt: skip
        cls = ' class="tiny"' if r.tiny else ""
        body.append(f'<tr{cls} data-model="{e(r.model)}" data-run-id="{e(r.run_id)}">{cells}</tr>')
    legend = "".join(f"<p>{e(x)}</p>" for x in _legend(board))
    updated = e(time.strftime("%Y-%m-%d %H:%M:%S"))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{e(board.experiment)} leaderboard</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: 0.3em 0.7em; text-align: right; }}
th:first-child, td:first-child {{ text-align: left; }}
td.best {{ background: #e6f4e6; }}
tr.tiny td {{ color: #888; }}
</style></head>
<body>
<h1>{e(board.experiment)} leaderboard</h1>
{legend}
<table id="leaderboard">
<thead><tr>{head}</tr></thead>
<tbody>
{chr(10).join(body)}
</tbody>
</table>
<p>MLflow: {e(board.uri)}, experiment <code>{e(board.experiment)}</code>; updated {updated}.</p>
</body></html>
"""


def log(board: Board, out: str | None = None) -> str:
    """Make the leaderboard the description of the benchmark's experiment (:func:`description`, shown by the MLflow
    UI above the runs), tag the experiment as model training (:func:`loom.platform.tracking.ensure_experiment`),
    and write ``leaderboard.md`` and ``leaderboard.html`` into ``out`` when given; returns the experiment id."""
    import mlflow

    from loom.platform.tracking import NOTE_TAG, ensure_experiment

    client = mlflow.MlflowClient(tracking_uri=board.uri)
    exp_id = ensure_experiment(board.uri, board.experiment)
    client.set_experiment_tag(exp_id, NOTE_TAG, description(board))
    client.set_experiment_tag(exp_id, "loom.leaderboard.updated", time.strftime("%Y-%m-%dT%H:%M:%S"))
    client.set_experiment_tag(exp_id, "loom.leaderboard.rows", str(len(board.rows)))
    if out:
        os.makedirs(out, exist_ok=True)
        for name, text in (("leaderboard.md", to_markdown(board)), ("leaderboard.html", to_html(board))):
            with open(os.path.join(out, name), "w", encoding="utf-8") as f:
                f.write(text)
    return exp_id

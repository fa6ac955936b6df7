"""The report as one self-contained HTML page: ``closedloop report --html FILE``.

:func:`html_report` reads a window of a store through the learning layer's public queries —
:func:`report_from_store`, :func:`trends`, :func:`failure_clusters`, :func:`factors` — and
writes one page: inline CSS, charts as inline SVG (:mod:`closedloop.learn._charts`), no
script, no link, no image, nothing fetched from a network. Sections: summary, pass rates per
task type over the window's periods (with confidence bands), failure clusters (count, first
and last seen, per-period counts, example trace ids), factors (failure rate per value with
its confidence interval as an error bar), cost (total, per success, over time) and latency
percentiles.

Every stored string is escaped (:func:`~closedloop.learn._charts.esc`). The page holds
nothing but the store's data (no time of writing), so the same store gives the same bytes.
Its size is bounded: at most ``max_task_types`` lines per chart and rows per table,
``max_clusters`` clusters, ``max_factors`` dimensions of ``max_values`` values each.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from closedloop._errors import ConfigError
from closedloop.learn._charts import (
    ChartLine,
    ChartPoint,
    ChartRow,
    bar_chart,
    esc,
    interval_chart,
    line_chart,
    millis,
    percent,
    spark_svg,
    usd,
)
from closedloop.learn._clusters import FailureClusters, failure_clusters
from closedloop.learn._factors import Factors, factors
from closedloop.learn._report import Rate, Report, TaskStats, report_from_store
from closedloop.learn._trends import Trends, TrendSeries, trends

if TYPE_CHECKING:
    from closedloop.store import Store

HOUR_WINDOW_MAX_SPAN = 3 * 86_400.0
"""A window of events spanning up to this many seconds is charted per hour, else per day."""
_NONE = "—"

CSS = """
*{box-sizing:border-box}
body{margin:0;background:#f3f4f6;color:#111827;
 font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif}
main{max-width:1220px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}
h2{font-size:17px;margin:0 0 12px}
h3{font-size:14px;margin:0 0 6px}
.sub{color:#4b5563;margin:0 0 18px;overflow-wrap:anywhere}
section{background:#fff;border:1px solid #e5e7eb;border-radius:8px;padding:16px 18px;
 margin:0 0 18px}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(150px,1fr));gap:12px}
.card{background:#f9fafb;border:1px solid #e5e7eb;border-radius:6px;padding:10px 12px}
.card b{display:block;font-size:20px}
.card span{color:#4b5563;font-size:12px}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(540px,1fr));gap:16px}
figure{margin:0}
figcaption{font-weight:600;margin:0 0 4px}
svg.chart{max-width:100%;height:auto;display:block}
svg.spark{vertical-align:middle}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;margin:8px 0 0;font-size:13px}
th,td{text-align:right;padding:4px 8px;border-bottom:1px solid #e5e7eb;vertical-align:top}
th{color:#374151;font-weight:600;background:#f9fafb}
td{white-space:nowrap}
th.t,td.t{text-align:left}
td.t{white-space:normal;overflow-wrap:break-word;max-width:420px}
code{font:11px ui-monospace,"DejaVu Sans Mono",monospace;color:#374151;white-space:nowrap}
.note{color:#6b7280;font-size:12px;margin:6px 0 0}
.sig{color:#b91c1c;font-weight:600}
.factor{margin:0 0 14px}
.what{min-width:300px}
"""


@dataclass(frozen=True, slots=True)
class _Data:
    report: Report
    trends: Trends
    clusters: FailureClusters | None
    clusters_error: str | None
    factors: Factors


def choose_window(report: Report) -> str:
    """``hour`` when the report's events span up to three days, else ``day``."""
    first, last = report.overall.first_ts, report.overall.last_ts
    if first is None or last is None or last - first <= HOUR_WINDOW_MAX_SPAN:
        return "hour"
    return "day"


def html_report(store: Store, *, since: float | None = None, task_type: str | None = None,
                window: str | None = None, max_task_types: int = 8, max_clusters: int = 10,
                max_factors: int = 6, max_values: int = 24, title: str | None = None,
                report: Report | None = None) -> str:
    """The page of ``store``'s events from ``since`` (of ``task_type``), charted per
    ``window`` (``hour`` or ``day``; default :func:`choose_window`). ``title`` names the
    store in the heading (default: its URL); ``report``, when the caller has it already, is
    :func:`report_from_store` of the same window. See the module's docstring."""
    for name, cap in (("max_task_types", max_task_types), ("max_clusters", max_clusters),
                      ("max_factors", max_factors), ("max_values", max_values)):
        if isinstance(cap, bool) or not isinstance(cap, int) or cap < 1:
            raise ConfigError(f"{name} must be an integer ≥ 1, got {cap!r}")
    if report is None:
        report = report_from_store(store, since=since, task_type=task_type)
    window = window or choose_window(report)
    if window not in ("hour", "day"):
        raise ConfigError(f"window must be 'hour' or 'day', got {window!r}")
    trend = trends(store, by="task_type", window=window, since=since, task_type=task_type)
    clusters: FailureClusters | None = None
    clusters_error = None
    try:
        clusters = failure_clusters(store, window=window, since=since, task_type=task_type,
                                    top=max_clusters, examples=3)
    except ConfigError as exc:  # drain3 is in the learn extra
        clusters_error = str(exc)
    found = factors(store, since=since, task_type=task_type)
    data = _Data(report=report, trends=trend, clusters=clusters,
                 clusters_error=clusters_error, factors=found)
    return _page(data, title=title if title is not None else getattr(store, "url", ""),
                 lines=max_task_types, max_factors=max_factors, max_values=max_values)


# ----- page --------------------------------------------------------------------------------

def _iso(ts: float | None, window: str = "second") -> str:
    if ts is None:
        return _NONE
    fmt = {"hour": "%m-%d %H:00", "day": "%m-%d",
           "minute": "%Y-%m-%d %H:%M"}.get(window, "%Y-%m-%d %H:%M:%S UTC")
    return time.strftime(fmt, time.gmtime(ts))


def _rate(rate: Rate) -> str:
    return _NONE if rate.value is None else f"{percent(rate.value)} ({rate.count:,}/{rate.total:,})"


def _opt(value: float | None, fmt: Callable[[float], str]) -> str:
    return _NONE if value is None else fmt(value)


def _table(headers: tuple[str, ...], rows: Sequence[tuple[str, ...]], text_columns: int = 1) -> str:
    """A table of already escaped cells; the first ``text_columns`` columns are text."""
    head = "".join(f'<th class="t">{h}</th>' if i < text_columns else f"<th>{h}</th>"
                   for i, h in enumerate(headers))
    body = "".join(
        "<tr>" + "".join(f'<td class="t">{c}</td>' if i < text_columns else f"<td>{c}</td>"
                         for i, c in enumerate(row)) + "</tr>" for row in rows)
    return (f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody>'
            "</table></div>")


def _more(shown: int, total: int, what: str) -> str:
    return f'<p class="note">{total - shown:,} more {what} not shown.</p>' if total > shown else ""


def _page(d: _Data, *, title: str, lines: int, max_factors: int, max_values: int) -> str:
    r = d.report
    first, last = r.overall.first_ts, r.overall.last_ts
    scope = f"task type {esc(r.task_type)}" if r.task_type is not None else "every task type"
    window = ("since " + _iso(r.since)) if r.since is not None else "all events"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>closedloop report — {esc(title, 80)}</title>",
        f"<style>{CSS}</style></head><body><main>",
        "<h1>closedloop report</h1>",
        f'<p class="sub">{esc(title)} · {scope} · {esc(window)} · events '
        f"{esc(_iso(first))} … {esc(_iso(last))} · charted per {esc(d.trends.window)}</p>",
    ]
    if r.empty:
        parts.append("<section><h2>No events</h2><p>No step was recorded in this window."
                     "</p></section>")
    else:
        parts += [_summary(r), _loops(d, lines), _clusters(d), _factors(d, max_factors,
                                                                        max_values),
                  _cost(d, lines), _latency(d, lines)]
    parts.append('<p class="note">Written by <code>closedloop report --html</code>. Intervals '
                 f"are {d.trends.confidence:.0%} confidence intervals (Wilson for rates). "
                 "Definitions: <code>closedloop report --help</code>, "
                 "<code>closedloop trends --help</code>.</p></main></body></html>\n")
    return "".join(parts)


def _summary(r: Report) -> str:
    o = r.overall
    failed = sum(n for k, n in o.outcomes.items() if k in ("failed", "error", "blocked"))
    cards = [
        (f"{o.runs:,}", "steps"),
        (_opt(o.validation.value, percent), "validation passed"),
        (_opt(o.verification.value, percent), "verification passed"),
        (percent(failed / o.runs) if o.runs else _NONE, "failed, error or blocked"),
        (_opt(o.reask.value, percent), "needed a re-ask"),
        (_opt(o.latency.p50_ms, millis), "latency p50"),
        (_opt(o.latency.p95_ms, millis), "latency p95"),
    ]
    if o.cost.priced:
        cards += [(_opt(o.cost.total_usd, usd), "cost"),
                  (_opt(o.cost.per_success_usd, usd), "cost per success")]
    body = "".join(f'<div class="card"><b>{esc(v)}</b><span>{esc(k)}</span></div>'
                   for v, k in cards)
    return f'<section id="summary"><h2>Summary</h2><div class="cards">{body}</div></section>'


def _top_series(t: Trends, lines: int) -> list[TrendSeries]:
    """The ``lines`` series with the most steps, in the trends' (name) order."""
    keep = sorted(t.series, key=lambda s: (-s.steps, s.value is None, s.value or ""))[:lines]
    return [s for s in t.series if s in keep]


def _series_chart(t: Trends, metric: str, title: str, lines: int, *,
                  fmt: Callable[[float], str] = percent, y_max: float | None = None) -> str:
    starts = list(t.periods)
    index = {s: i for i, s in enumerate(starts)}
    chart_lines = []
    for s in _top_series(t, lines):
        points: list[ChartPoint | None] = [None] * len(starts)
        for p in s.points:
            est = p.figures.get(metric)
            if est is not None and p.start in index:
                points[index[p.start]] = ChartPoint(est.value, est.low, est.high)
        chart_lines.append(ChartLine(s.value if s.value is not None else "(none)", points))
    labels = [_iso(s, t.window) for s in starts]
    svg = line_chart(chart_lines, labels, title=title, fmt=fmt, y_max=y_max)
    return f"<figure><figcaption>{esc(title)}</figcaption>{svg}</figure>"


def _rows(r: Report, lines: int) -> list[TaskStats]:
    return sorted(r.rows, key=lambda s: (-s.runs, s.task_type or ""))[:lines]


def _name(row: TaskStats) -> str:
    return esc(row.task_type if row.task_type is not None else "overall", 60)


def _loops(d: _Data, lines: int) -> str:
    t, r = d.trends, d.report
    charts = [_series_chart(t, "validation_pass_rate", "Validation pass rate", lines,
                            y_max=1.0),
              _series_chart(t, "verification_pass_rate", "Verification pass rate", lines,
                            y_max=1.0),
              _series_chart(t, "failure_rate", "Failure rate (failed, error, blocked)", lines),
              _series_chart(t, "reask_rate", "Re-ask rate", lines)]
    shown = _rows(r, lines)
    rows = [(_name(s), f"{s.runs:,}", esc(_rate(s.validation)), esc(_rate(s.reask)),
             esc(_rate(s.reask_success)), esc(_rate(s.verification)))
            for s in [*shown, r.overall]]
    table = _table(("Task type", "Steps", "Validation", "Re-ask", "Re-ask ok", "Verification"),
                   rows)
    return (f'<section id="trends"><h2>Pass rates per task type, per {esc(t.window)}</h2>'
            f'<div class="grid">{"".join(charts)}</div>{table}'
            f"{_more(len(shown), len(r.rows), 'task types')}"
            '<p class="note">Lines: the task types with the most steps; the shaded band is '
            "each period's confidence interval.</p></section>")


def _clusters(d: _Data) -> str:
    head = '<section id="failures"><h2>Failure clusters</h2>'
    if d.clusters is None:
        return f"{head}<p>{esc(d.clusters_error or '')}</p></section>"
    c = d.clusters
    if c.empty:
        return f"{head}<p>No step failed in this window.</p></section>"
    starts = list(d.trends.periods)
    bars = [ChartRow(f"{k.id} · {k.title}", float(k.count),
                     note=f"{k.count:,} ({percent(k.share)})") for k in c.clusters]
    chart = bar_chart(bars, title="Failures per cluster", width=1160, label_width=520,
                      fmt=lambda v: f"{v:,.0f}" if v == int(v) else f"{v:,.1f}")
    rows = []
    for k in c.clusters:
        per = dict(k.periods)
        spark = spark_svg([float(per.get(s, 0)) for s in starts],
                          title=f"failures per {d.trends.window}: {k.title}")
        tasks = ", ".join(f"{esc(tt, 40)} ({n:,})" for tt, n in k.task_types[:3])
        examples = "<br>".join(f"<code>{esc(e)}</code>" for e in k.examples)
        what = f'<div class="what">{esc(k.error_type)}: {esc(k.title, 300)}</div>'
        rows.append((f"<code>{esc(k.id)}</code>", what, tasks,
                     f"{k.count:,} ({esc(percent(k.share))})",
                     esc(_iso(k.first_ts, "minute")).replace(" ", "<br>", 1),
                     esc(_iso(k.last_ts, "minute")).replace(" ", "<br>", 1), spark,
                     examples or _NONE))
    table = _table(("Cluster", "What went wrong", "Task types", "Failures", "First seen",
                    "Last seen", f"Per {esc(d.trends.window)}", "Example traces"), rows,
                   text_columns=3)
    shown = len(c.clusters)
    return (f"{head}<p class=\"note\">{c.failures:,} failed steps of {c.steps:,}; "
            f"{'clusters, largest first' if shown > 1 else 'one cluster'}. "
            f"<code>closedloop traces show ID</code> opens an example.</p>{chart}{table}"
            "</section>")


def _factors(d: _Data, max_factors: int, max_values: int) -> str:
    f = d.factors
    head = '<section id="factors"><h2>Factors: what goes with failure</h2>'
    if not f.factors:
        return (f"{head}<p>No dimension (model, versions, labels, hour, input size) has two "
                "values in this window.</p></section>")
    blocks = []
    for factor in f.factors[:max_factors]:
        values = factor.values[:max_values]
        rows = [ChartRow(v.value if v.value is not None else "(none)", v.rate.value, v.rate.low,
                    v.rate.high, note=f"{percent(v.rate.value)} ({v.failures:,}/{v.steps:,})")
                for v in values]
        verdict = ('<span class="sig">significant</span>' if factor.significant
                   else "not significant")
        svg = interval_chart(rows, title=f"Failure rate by {factor.dimension}", width=1160,
                             label_width=260)
        blocks.append(
            f'<div class="factor"><h3>{esc(factor.dimension)}</h3><p class="note">explains '
            f"{factor.explained:.1%} of the uncertainty about failure · G = {factor.g:.1f}, "
            f"p = {factor.p_value:.2g} · {verdict}</p>{svg}"
            f"{_more(len(values), len(factor.values), 'values')}</div>")
    return (f"{head}<p class=\"note\">Overall failure rate "
            f"{percent(f.failures / f.steps) if f.steps else _NONE} ({f.failures:,}/"
            f"{f.steps:,}); dimensions ranked by how much of failure they explain; each bar is "
            f"a {f.confidence:.0%} interval.</p>{''.join(blocks)}"
            f"{_more(min(len(f.factors), max_factors), len(f.factors), 'dimensions')}"
            "</section>")


def _cost(d: _Data, lines: int) -> str:
    r = d.report
    head = '<section id="cost"><h2>Cost</h2>'
    if not r.overall.cost.priced:
        return f"{head}<p>No step in this window recorded a cost.</p></section>"
    shown = _rows(r, lines)
    bars = [ChartRow(s.task_type or "", s.cost.total_usd or 0.0,
                note=f"{usd(s.cost.total_usd or 0.0)}") for s in shown]
    rows = [(_name(s), esc(_opt(s.cost.total_usd, usd)), f"{s.cost.priced:,}/{s.runs:,}",
             esc(_opt(s.cost.per_success_usd, usd))) for s in [*shown, r.overall]]
    charts = [_series_chart(d.trends, "cost_per_success", "Cost per success (USD)", lines,
                            fmt=usd),
              _series_chart(d.trends, "cost_per_step", "Cost per step (USD)", lines, fmt=usd)]
    total = bar_chart(bars, title="Total cost per task type", fmt=usd, width=1160,
                      label_width=260)
    return (f"{head}{total}"
            f'<div class="grid">{"".join(charts)}</div>'
            f"{_table(('Task type', 'Total', 'Priced steps', 'Per success'), rows)}"
            f"{_more(len(shown), len(r.rows), 'task types')}"
            '<p class="note">Per success: every priced step\'s cost (failures and re-asks '
            "included) over the steps that succeeded.</p></section>")


def _latency(d: _Data, lines: int) -> str:
    r = d.report
    shown = _rows(r, lines)
    rows = [(_name(s), esc(_opt(s.latency.p50_ms, millis)), esc(_opt(s.latency.p95_ms, millis)),
             esc(_opt(s.latency.mean_ms, millis)), esc(_opt(s.latency.max_ms, millis)))
            for s in [*shown, r.overall]]
    charts = [_series_chart(d.trends, "latency_p50_ms", "Latency p50 (estimated)", lines,
                            fmt=millis),
              _series_chart(d.trends, "latency_p95_ms", "Latency p95 (estimated)", lines,
                            fmt=millis)]
    return ('<section id="latency"><h2>Latency</h2>'
            f'<div class="grid">{"".join(charts)}</div>'
            f"{_table(('Task type', 'p50', 'p95', 'Mean', 'Max'), rows)}"
            f"{_more(len(shown), len(r.rows), 'task types')}"
            '<p class="note">The table\'s percentiles are exact (nearest rank); the charts\' '
            "come from a latency histogram (within its bucket of the exact one).</p></section>")

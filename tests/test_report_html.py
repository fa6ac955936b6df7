"""``closedloop report --html``: one self-contained page of charts, safe for hostile stored text,
the same bytes for the same store, bounded on a big store; and the SVG charts it is made of."""

from __future__ import annotations

import itertools
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

import closedloop as cl
from closedloop.cli import main
from closedloop.learn import (
    ChartLine,
    ChartPoint,
    ChartRow,
    bar_chart,
    esc,
    html_report,
    interval_chart,
    line_chart,
    spark_svg,
)

HOUR = 3600.0
DAY = 86_400.0
T0 = 1_790_035_200.0  # a midnight, UTC
EVIL = "<script>alert(1)</script>\"'><img src=x onerror=alert(2)>&amp;\x1b[31mred\x1b[0m"
# every element the page may hold: anything else came from the data
ALLOWED_TAGS = {"html", "head", "meta", "title", "style", "body", "main", "h1", "h2", "h3", "p",
                "section", "div", "span", "b", "br", "code", "figure", "figcaption", "table",
                "thead", "tbody", "tr", "th", "td", "svg", "line", "text", "polyline", "polygon",
                "circle", "rect"}
ALLOWED_ATTRS = {"lang", "charset", "name", "content", "class", "id", "viewbox", "width",
                 "height", "role", "aria-label", "font-family", "font-size", "x", "y", "x1",
                 "x2", "y1", "y2", "cx", "cy", "r", "rx", "points", "fill", "fill-opacity",
                 "stroke", "stroke-width", "stroke-linejoin", "text-anchor"}


def ev(i: int, ts: float, **kw: Any) -> cl.StepEvent:
    base = cl.StepEvent(
        ts=ts, trace_id=f"{i:032x}", agent_id="a", task_type="deploy", autonomy="autonomous",
        outcome="succeeded", attempts=1, input_tokens=100, output_tokens=20, latency_ms=20.0,
        validation_passed=True, verification_passed=True, error_type=None, error_message=None,
        propose_ms=1.0, validate_ms=1.0, act_ms=1.0, verify_ms=1.0, detail=None,
        model="m-small", cost_usd=0.002)
    return base._replace(**kw)


def fail(i: int, ts: float, message: str, **kw: Any) -> cl.StepEvent:
    return ev(i, ts, outcome="failed", verification_passed=False, error_type="verification",
              error_message=message, **kw)


def fill(path: Path, events: list[cl.StepEvent]) -> str:
    url = f"sqlite:///{path}"
    store = cl.open_store(url)
    for e in events:
        store.record(e)
    assert store.flush()
    store.close()
    return url


def page_of(url: str, **kw: Any) -> str:
    with cl.open_store(url, read_only=True, create=False) as store:
        return html_report(store, title="test store", **kw)


def week(task_types: tuple[str, ...] = ("deploy", "scale"), model: str = "m-large",
         label: str = "blue") -> list[cl.StepEvent]:
    """Seven days of steps: deploy fails more with the large model, more as days pass."""
    out = []
    for i in range(7 * 24 * 2):
        ts = T0 + i * HOUR / 2
        task = task_types[i % len(task_types)]
        big = i % 3 == 0
        kw = {"task_type": task, "model": model if big else "m-small",
              "labels": {"colour": label if i % 2 else "red"}}
        if big and (i // 48) % 7 >= i % 5:
            out.append(fail(i, ts, f"check: [error] tag_missing at tags.env: i-{i:04x} has no "
                               "tag 'env'", **kw))
        else:
            out.append(ev(i, ts, latency_ms=10.0 + i % 40, **kw))
    return out


class Page(HTMLParser):
    """Every element, attribute and text of a page, as a browser's parser sees them."""

    def __init__(self, text: str) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []
        self.data: list[str] = []
        self.feed(text)
        self.close()

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        self.attrs += attrs

    def handle_data(self, data: str) -> None:
        self.data.append(data)

    @property
    def text(self) -> str:
        return "".join(self.data)


# ----- the page ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def weekly(tmp_path_factory: pytest.TempPathFactory) -> str:
    return fill(tmp_path_factory.mktemp("html") / "week.db", week())


def test_the_page_holds_every_section_with_the_stores_figures(weekly: str) -> None:
    page = page_of(weekly)
    parsed = Page(page)
    ids = [v for k, v in parsed.attrs if k == "id"]
    assert ids == ["summary", "trends", "failures", "factors", "cost", "latency"]
    text = parsed.text
    assert "charted per day" in text  # seven days of steps: one point per day
    assert "Validation pass rate" in text and "Verification pass rate" in text
    # the cluster: its count, first/last time and its newest trace ids
    with cl.open_store(weekly, read_only=True, create=False) as store:
        failed = [e for e in store.events() if e.outcome == "failed"]
    assert f"{len(failed)} failed steps of 336" in text
    assert "check: tag_missing — <*> has no tag 'env'" in text
    assert failed[-1].trace_id in text and failed[-2].trace_id in text
    assert "2026-09-22 00:00" in text  # first seen: the first failure, at T0
    # factors: the model goes with failure; each value with its count and interval
    assert "model" in ids or "model" in text
    large = [e for e in failed if e.model == "m-large"]
    assert f"({len(large)}/112)" in text
    # cost: total and per success
    total = 0.002 * 336
    assert f"${total:.3g}" in text
    assert f"${total / (336 - len(failed)):.3g}" in text
    # one trend line per task type in each of the six charts, a band per line
    assert parsed.tags.count("polyline") >= 2 * 6 + 1  # (+ the cluster's per-day spark)
    assert parsed.tags.count("polygon") >= 2 * 6


def test_the_page_is_self_contained(weekly: str) -> None:
    page = page_of(weekly)
    parsed = Page(page)
    assert set(parsed.tags) <= ALLOWED_TAGS
    assert {k for k, _ in parsed.attrs} <= ALLOWED_ATTRS  # no src, href, on*, style=
    for fetch in ("http:", "https:", "url(", "@import", "//"):
        assert fetch not in page
    assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>\n")


def test_hostile_stored_text_is_shown_as_text_never_as_markup(tmp_path: Path) -> None:
    events = [
        e._replace(trace_id=f"{EVIL}{i}")
        for i, e in enumerate(week(task_types=(f"deploy {EVIL}", EVIL), model=f"model {EVIL}",
                                   label=f"label {EVIL}"))]
    events = [e._replace(error_message=f"{e.error_message} {EVIL}") if e.error_message else e
              for e in events]
    events = [e._replace(labels={f"key {EVIL}": f"v {EVIL}"}) if i % 4 == 0 else e
              for i, e in enumerate(events)]
    page = page_of(fill(tmp_path / "evil.db", events), max_clusters=3)
    parsed = Page(page)
    assert set(parsed.tags) <= ALLOWED_TAGS, set(parsed.tags) - ALLOWED_TAGS
    assert {k for k, _ in parsed.attrs} <= ALLOWED_ATTRS
    assert "<script" not in page and "<img" not in page
    assert "\x1b" not in page  # controls are shown escaped
    shown = EVIL.replace("\x1b", "\\x1b")
    text = parsed.text
    assert f"deploy {shown}" in text  # the task type, as the reader sees it
    assert f"model {shown}" in text and f"v {shown}" in text and f"key {shown}" in text
    assert any(f"{shown}{i}" in text for i in range(0, 336, 3))  # failures' trace ids


def test_the_same_store_gives_the_same_page(tmp_path: Path, weekly: str) -> None:
    again = fill(tmp_path / "again.db", week())
    first = page_of(weekly)
    assert page_of(again) == first  # another file, the same events: the same bytes
    assert page_of(weekly) == first


def test_a_big_store_gives_a_bounded_page(tmp_path: Path) -> None:
    events = []
    words = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india",
             "juliet", "kilo", "lima", "mike", "november", "oscar", "papa")
    for i in range(3000):
        kw = {"task_type": f"task {i % 40:02d}", "model": f"model {i % 90:02d}",
              "labels": {"tenant": f"t{i % 120}"}}
        if i % 2:
            a, b = words[i % 16], words[(i // 16) % 16]
            events.append(fail(i, T0 + i * 60.0, f"{a} {b} broke", **kw))
        else:
            events.append(ev(i, T0 + i * 60.0, **kw))
    page = page_of(fill(tmp_path / "big.db", events), max_task_types=5, max_clusters=4,
                   max_factors=2, max_values=7)
    parsed = Page(page)
    assert len(page) < 120_000
    assert "35 more task types not shown." in parsed.text
    failures = page.split('id="failures"')[1].split("</section>")[0]
    assert failures.count("<tr>") == 1 + 4  # the header and four clusters
    factors = page.split('id="factors"')[1].split("</section>")[0]
    assert factors.count('class="factor"') == 2
    assert factors.count("more values not shown") == 2
    assert factors.count("<circle") == 2 * 7
    # each line chart draws five task types at most (a legend entry per line)
    trends = page.split('id="trends"')[1].split("</section>")[0]
    assert trends.count('<rect x=') == 4 * 5


def test_an_empty_window_says_so(tmp_path: Path, weekly: str) -> None:
    page = page_of(weekly, since=T0 + 30 * DAY)
    assert "No step was recorded in this window." in Page(page).text
    with pytest.raises(cl.ConfigError, match="max_clusters"):
        page_of(weekly, max_clusters=0)
    with pytest.raises(cl.ConfigError, match="window"):
        page_of(weekly, window="minute")


def test_a_short_span_is_charted_per_hour(tmp_path: Path) -> None:
    url = fill(tmp_path / "day.db", [ev(i, T0 + i * 600.0) for i in range(200)])
    assert "charted per hour" in Page(page_of(url)).text
    assert "charted per day" in Page(page_of(url, window="day")).text


# ----- the command -------------------------------------------------------------------------

def test_report_html_writes_the_page_and_keeps_text_and_json(tmp_path: Path,
                                                            weekly: str) -> None:
    out = tmp_path / "report.html"
    runner = CliRunner()
    result = runner.invoke(main, ["report", "--html", str(out), "--store", weekly])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out} (")
    page = out.read_text(encoding="utf-8")
    assert Page(page).tags.count("section") == 6
    assert page == page_of(weekly).replace("test store", weekly)
    assert not list(tmp_path.glob(".report-*"))  # the temporary file was renamed
    text = runner.invoke(main, ["report", "--store", weekly])
    assert text.exit_code == 0 and "Feedback loops" in text.output
    both = runner.invoke(main, ["report", "--json", "--html", str(tmp_path / "b.html"),
                                "--store", weekly])
    assert both.exit_code == 0 and both.output.startswith("{")
    assert (tmp_path / "b.html").exists()


def test_report_html_window_flag(tmp_path: Path) -> None:
    url = fill(tmp_path / "day.db", [ev(i, T0 + i * 600.0) for i in range(200)])
    for flag, shown in (("auto", "charted per hour"), ("day", "charted per day"),
                        ("hour", "charted per hour")):
        out = tmp_path / f"{flag}.html"
        result = CliRunner().invoke(main, ["report", "--html", str(out), "--window", flag,
                                           "--store", url])
        assert result.exit_code == 0, result.output
        assert shown in Page(out.read_text(encoding="utf-8")).text


def test_report_html_on_an_empty_window_or_a_bad_path_fails_cleanly(tmp_path: Path,
                                                                  weekly: str) -> None:
    runner = CliRunner()
    out = tmp_path / "none.html"
    result = runner.invoke(main, ["report", "--html", str(out), "--since", "2099-01-01",
                                  "--store", weekly])
    assert result.exit_code == 1 and not out.exists()
    bad = tmp_path / "missing-dir" / "r.html"
    result = runner.invoke(main, ["report", "--html", str(bad), "--store", weekly])
    assert result.exit_code == 1
    assert "cannot write" in result.output and "Traceback" not in result.output


# ----- the charts --------------------------------------------------------------------------

def coords(svg: str, tag: str, attr: str) -> list[float]:
    return [float(m) for m in re.findall(rf'<{tag} [^>]*?\b{attr}="([-\d.]+)"', svg)]


def test_esc_escapes_markup_and_controls_and_cuts() -> None:
    assert esc('<b a="1">&\'') == "&lt;b a=&quot;1&quot;&gt;&amp;&#x27;"
    assert esc("a\x1b[31mb\u202ec") == "a\\x1b[31mb\\u202ec"
    assert esc("abcdefgh", 5) == "abcd…"
    assert esc(3.5) == "3.5"


def test_a_line_chart_breaks_at_a_missing_point_and_draws_bands() -> None:
    p = ChartPoint(0.5, 0.4, 0.6)
    svg = line_chart([ChartLine("a", [p, p, None, p, p]), ChartLine("b", [p] * 5)],
                     ["1", "2", "3", "4", "5"], title="t", y_max=1.0)
    assert svg.count("<polyline") == 3  # a: two runs; b: one
    assert svg.count("<polygon") == 3
    assert svg.count("<circle") == 9
    # y: 0.5 of a 0-1 axis is the middle of the plot (top 10, height 240 - 10 - 26 - 18)
    plot_h = 240 - 10 - 26 - 18
    assert set(coords(svg, "circle", "cy")) == {10 + plot_h / 2}
    assert ">100%<" in svg and ">50%<" in svg


def test_a_line_chart_rounds_its_axis_and_keeps_labels_apart() -> None:
    svg = line_chart([ChartLine("a", [ChartPoint(0.3, 0.2, 0.45)] * 48)],
                     [f"11-{d:02d} {h:02d}:00" for d in (1, 2) for h in range(24)], title="t")
    assert ">60%<" in svg and ">15%<" in svg  # 0.45 rounds up to 60 %, a quarter is 15 %
    ticks = re.findall(r'<text x="([\d.]+)" y="[\d.]+" text-anchor="middle" '
                       r'fill="#6b7280">([^<]+)<', svg)
    assert 2 <= len(ticks) <= 8 and ticks[0][1] == "11-01 00:00"
    xs = [float(x) for x, _ in ticks]
    assert min(b - a for a, b in itertools.pairwise(xs)) > 11 * 7  # 11 characters


def test_an_interval_chart_draws_each_value_and_its_error_bar() -> None:
    svg = interval_chart([ChartRow("a", 0.5, 0.25, 0.75, note="n"), ChartRow("b", 0.1, 0.0,
                                                                              0.2)],
                         title="t", x_max=1.0, width=600, label_width=100)
    left, right = 100 + 8, 600 - 150 - 8
    def x(v: float) -> float:
        return left + (right - left) * v
    assert coords(svg, "circle", "cx") == [x(0.5), x(0.1)]
    whiskers = re.findall(r'<line x1="([\d.]+)" x2="([\d.]+)" y1="([\d.]+)" y2="\3"', svg)
    spans = [(float(a), float(b)) for a, b, _ in whiskers if float(a) != float(b)]
    assert (x(0.25), x(0.75)) in spans and (x(0.0), x(0.2)) in spans


def test_a_bar_chart_draws_bars_in_proportion() -> None:
    svg = bar_chart([ChartRow("a", 10.0), ChartRow("b", 5.0)], title="t", x_max=10.0,
                    width=600, label_width=100)
    widths = coords(svg, "rect", "width")
    assert widths == [600 - 150 - 8 - 108, (600 - 150 - 8 - 108) / 2]


def test_a_spark_draws_a_line_and_marks_its_last_value() -> None:
    svg = spark_svg([1.0, None, 3.0], title="<x>")
    assert svg.count("<circle") == 1 and "<title>&lt;x&gt;</title>" in svg

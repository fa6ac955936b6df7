"""The long-term learning layer: what the recorded events and traces say afterwards.

Every step's :class:`~closedloop.StepEvent` lands in the store; this package turns a window
of them into signals — validation and verification pass rates, how often re-ask was needed
and whether it worked, outcomes, latency percentiles, tokens and the most frequent errors.
:func:`build_report` is its first query (``closedloop report`` prints it);
:func:`trends` (period over period, with confidence intervals), :func:`failure_clusters`
(what went wrong, mined into templates) and :func:`factors` (which dimension goes with
failure) answer the design's questions (``closedloop trends``, ``failures``, ``factors``;
docs/learning.md).

It also reads the recorded traces back, off the agent's hot path: :func:`span_label` and
:func:`verdict_messages` (``closedloop traces show``), :func:`diff_traces` and
:func:`first_divergence` (``traces diff``), :func:`replay` (today's checks on recorded
proposals, ``closedloop replay``) and :func:`score_summary` (the scores section of the
report). None of it needs OpenTelemetry.
"""

import typing

if typing.TYPE_CHECKING:
    from closedloop._figures import (
        message_group,
        percentile,
    )
    from closedloop.learn._charts import (
        ChartLine,
        ChartPoint,
        ChartRow,
        bar_chart,
        esc,
        interval_chart,
        line_chart,
        spark_svg,
    )
    from closedloop.learn._clusters import (
        FailureCluster,
        FailureClusters,
        Purity,
        cluster_purity,
        clusters_from_cells,
        failure_clusters,
        parse_issues,
    )
    from closedloop.learn._detect import (
        BernoulliCusum,
        CusumState,
        Detection,
        GaussianCusum,
        PageHinkley,
        PageHinkleyState,
    )
    from closedloop.learn._diff import (
        DiffRow,
        diff_traces,
        first_divergence,
        span_label,
        verdict_messages,
    )
    from closedloop.learn._drift import ACTIONS, SIGNALS, DriftMonitor, DriftPolicy, Firing
    from closedloop.learn._driftguard import (
        DriftGuard,
        OnlineScorer,
        recorded_firings,
    )
    from closedloop.learn._factors import (
        Factor,
        Factors,
        FactorValue,
        factors,
        factors_from_cells,
        factors_from_margins,
    )
    from closedloop.learn._html import (
        choose_window,
        html_report,
    )
    from closedloop.learn._replay import (
        CheckReplay,
        ReplayReport,
        replay,
    )
    from closedloop.learn._report import (
        DEFAULT_TOP_ERRORS,
        DEFAULT_TOP_MESSAGES,
        Cost,
        ErrorCount,
        Latency,
        MessageCount,
        Rate,
        Report,
        TaskStats,
        Tokens,
        build_report,
        report_from_store,
    )
    from closedloop.learn._scores import (
        score_summary,
    )
    from closedloop.learn._stats import (
        Change,
        Estimate,
    )
    from closedloop.learn._trends import (
        DEFAULT_PERIODS,
        METRICS,
        TrendPoint,
        Trends,
        TrendSeries,
        trends,
        trends_from_cells,
    )

__all__ = [
    "ACTIONS",
    "DEFAULT_PERIODS",
    "DEFAULT_TOP_ERRORS",
    "DEFAULT_TOP_MESSAGES",
    "METRICS",
    "SIGNALS",
    "BernoulliCusum",
    "Change",
    "ChartLine",
    "ChartPoint",
    "ChartRow",
    "CheckReplay",
    "Cost",
    "CusumState",
    "Detection",
    "DiffRow",
    "DriftGuard",
    "DriftMonitor",
    "DriftPolicy",
    "ErrorCount",
    "Estimate",
    "Factor",
    "FactorValue",
    "Factors",
    "FailureCluster",
    "FailureClusters",
    "Firing",
    "GaussianCusum",
    "Latency",
    "MessageCount",
    "OnlineScorer",
    "PageHinkley",
    "PageHinkleyState",
    "Purity",
    "Rate",
    "ReplayReport",
    "Report",
    "TaskStats",
    "Tokens",
    "TrendPoint",
    "TrendSeries",
    "Trends",
    "bar_chart",
    "build_report",
    "choose_window",
    "cluster_purity",
    "clusters_from_cells",
    "diff_traces",
    "esc",
    "factors",
    "factors_from_cells",
    "factors_from_margins",
    "failure_clusters",
    "first_divergence",
    "html_report",
    "interval_chart",
    "line_chart",
    "message_group",
    "parse_issues",
    "percentile",
    "recorded_firings",
    "replay",
    "report_from_store",
    "score_summary",
    "span_label",
    "spark_svg",
    "trends",
    "trends_from_cells",
    "verdict_messages",
]


if not typing.TYPE_CHECKING:  # type checkers read the imports above; at run time, import on use
    from closedloop._lazy import lazy_exports as _lazy_exports

    __getattr__, __dir__ = _lazy_exports(__name__, {
        "closedloop._figures": ("message_group", "percentile"),
        "._charts": ("ChartLine", "ChartPoint", "ChartRow", "bar_chart", "esc", "interval_chart",
                     "line_chart", "spark_svg"),
        "._html": ("choose_window", "html_report"),
        "._clusters": ("FailureCluster", "FailureClusters", "Purity", "cluster_purity",
                       "clusters_from_cells", "failure_clusters", "parse_issues"),
        "._detect": ("BernoulliCusum", "CusumState", "Detection", "GaussianCusum", "PageHinkley",
                     "PageHinkleyState"),
        "._drift": ("ACTIONS", "SIGNALS", "DriftMonitor", "DriftPolicy", "Firing"),
        "._driftguard": ("DriftGuard", "OnlineScorer", "recorded_firings"),
        "._diff": ("DiffRow", "diff_traces", "first_divergence", "span_label", "verdict_messages"),
        "._factors": ("Factor", "FactorValue", "Factors", "factors", "factors_from_cells",
                       "factors_from_margins"),
        "._replay": ("CheckReplay", "ReplayReport", "replay"),
        "._report": ("DEFAULT_TOP_ERRORS", "DEFAULT_TOP_MESSAGES", "Cost", "ErrorCount", "Latency",
                     "MessageCount", "Rate", "Report", "TaskStats", "Tokens", "build_report",
                     "report_from_store"),
        "._scores": ("score_summary",),
        "._stats": ("Change", "Estimate"),
        "._trends": ("DEFAULT_PERIODS", "METRICS", "TrendPoint", "TrendSeries", "Trends", "trends",
                     "trends_from_cells"),
    })

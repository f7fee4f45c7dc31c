"""Prometheus export of every job and of the daemon itself, computed at scrape time.

Nothing here holds state that the daemon also holds. The daemon hands in two callables:

* ``jobs()`` returns an iterable of :class:`JobView` — one small, read-only snapshot per job,
  built from the job's engine when the scrape happens;
* ``stats()`` returns a :class:`DaemonStatsView` with the daemon's own counters.

Two consumers read them:

* :class:`LrpilotCollector` is a ``prometheus_client`` collector (``registry.register(...)``),
  yielding metric families from ``collect()``; tests read values back with
  ``registry.get_sample_value()``.
* :class:`MetricsRenderer` writes the text exposition format (version 0.0.4) directly and
  caches the bytes for ``cache_seconds``. ``prometheus_client.generate_latest`` spends most of
  its time building and re-escaping one ``Sample`` per series: with 1,000 jobs (~26 series
  each) it takes ~190 ms here, too slow to serve from the event loop. The renderer formats
  lines itself, escapes each label value once, and keeps (in a :class:`RenderMemo`) the lines
  of each job's LRs and counters, which rarely change between scrapes, and templates of the
  lines whose numbers change at every scrape (metric values, steps, last-seen times), so
  that only those numbers are formatted (``python bench/bench_exporter.py``). The test suite
  checks that both paths export the same samples, and that a render from a warm memo equals
  one from scratch.

Metric catalogue (the job label is ``training_job``: Prometheus' own ``job`` label names the
scrape job)::

    lrpilot_job_learning_rate{training_job,param_group}          gauge
    lrpilot_job_min_lr_ratio{training_job,param_group}           gauge   lr / floor, +Inf if no floor
    lrpilot_job_metric_value{training_job,metric}                gauge   last value, NaN kept
    lrpilot_job_nonfinite_total{training_job,metric}             counter
    lrpilot_job_detections_total{training_job,detector}          counter
    lrpilot_job_decisions_total{training_job,kind,reason}        counter reason = source detector/policy
    lrpilot_job_plateau_bad_evaluations{training_job}            gauge   only with a plateau policy
    lrpilot_job_last_seen_timestamp_seconds{training_job}        gauge
    lrpilot_job_step{training_job}                               gauge
    lrpilot_job_state{training_job,state}                        gauge   1 for the current state
    lrpilot_connections                                          gauge
    lrpilot_messages_received_total{type}                        counter
    lrpilot_points_received_total                                counter
    lrpilot_frames_rejected_total{reason}                        counter
    lrpilot_decision_latency_seconds                             histogram
    lrpilot_ingest_lag_seconds                                   gauge
    lrpilot_config_reloads_total{result="ok"|"error"}            counter
    lrpilot_jobs{state}                                          gauge
    lrpilot_build_info{version}                                  gauge   always 1
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, compress, repeat
from operator import attrgetter, is_, is_not, methodcaller
from typing import Final

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from . import __version__

__all__ = [
    "CONTENT_TYPE",
    "JOB_STATES",
    "DaemonStatsView",
    "HistogramView",
    "JobView",
    "LrpilotCollector",
    "MetricsRenderer",
    "RenderMemo",
    "expired",
    "render_text",
]

#: the Content-Type of the text exposition format the renderer writes
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"

#: every state a job can be in, in the order the exporter writes them
JOB_STATES: Final = ("running", "stale", "finished", "halted")

#: states after which a job's series may be dropped (see :func:`expired`)
_ENDED_STATES: Final = frozenset({"finished", "halted"})


# --------------------------------------------------------------------------------------------
# Views: what the daemon hands in
# --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class JobView:
    """A read-only snapshot of one job, built by the daemon when a scrape happens.

    Treat it as immutable (whoever built it may *renew* it, see ``stamp``); it is not a
    frozen dataclass because a scrape of 1,000 busy jobs would build 1,000 of them, and a
    frozen one costs three times as much to build.

    ``lrs`` and ``min_lrs`` are per param group (``min_lrs`` may be shorter or empty: a group
    without a floor exports a ratio of +Inf). ``metric_values`` holds the last value of every
    metric name the job reported (NaN stays NaN). ``detections`` counts firings per detector
    name; list every configured detector, with 0, so that ``increase()`` sees the first firing.
    ``nonfinite`` counts NaN/±Inf values per metric; every name in ``metric_values`` is exported
    with 0 when missing here. ``decisions`` counts decisions per ``(kind, reason)`` where
    ``reason`` is the decision's ``source`` (the detector or policy name, or ``"operator"``),
    a small set. ``last_seen`` is a Unix timestamp (seconds; exported to the millisecond);
    ``step`` the largest step any rank reported; both are None before the first record.

    ``steady`` is an optional promise from whoever builds the views: a token is of one job
    (no view of another name carries it), and two views of that job that carry the *same
    object* (not None) as ``steady`` have equal ``lrs``, ``min_lrs``, ``nonfinite``,
    ``detections``, ``decisions`` and ``state``, the same metric names in the same order, and
    the plateau count, last-seen time and step None in both or in neither. The renderer then
    takes only the new view's numbers (metric values, plateau count, last-seen time, step)
    and compares nothing else. The daemon gives it when it knows that nothing but those
    numbers changed; None (the default) has every part compared.

    ``stamp`` lets whoever built a view with a ``steady`` token hand the *same object* out
    again with other numbers: it may replace the view's plateau count, last-seen time and
    step in place (and the values in ``metric_values``, not its names), keeping everything
    the token promises, provided it also gives the view a ``stamp`` it never had before (an
    object that is not the old one: the daemon uses the job's growing version number). A
    renderer takes a view that is the same object as last time *and* has the same stamp as
    unchanged. The daemon renews the views of jobs that only reported numbers since the
    last scrape: no view is built, and no part of it is read, for them (the memory of 1,000
    jobs is cold at a scrape; every reference a new view takes costs a cache line).
    """

    name: str
    state: str
    lrs: tuple[float, ...]
    min_lrs: tuple[float, ...] = ()
    metric_values: Mapping[str, float] = field(default_factory=dict)
    detections: Mapping[str, int] = field(default_factory=dict)
    decisions: Mapping[tuple[str, str], int] = field(default_factory=dict)
    nonfinite: Mapping[str, int] = field(default_factory=dict)
    plateau_bad_evaluations: int | None = None
    last_seen: float | None = None
    step: int | None = None
    steady: object = None
    stamp: object = None

    def __post_init__(self) -> None:
        if self.state not in JOB_STATES:
            raise ValueError(
                f"JobView {self.name!r}: state {self.state!r} is not one of {', '.join(JOB_STATES)}"
            )


@dataclass(frozen=True, slots=True)
class HistogramView:
    """A histogram's cumulative bucket counts, as ``((upper_bound, count), ...)`` ascending.

    The +Inf bucket may be left out: it is then exported with ``count``.
    """

    buckets: tuple[tuple[float, int], ...] = ()
    sum: float = 0.0
    count: int = 0


@dataclass(frozen=True, slots=True)
class DaemonStatsView:
    """The daemon's own counters at scrape time.

    ``messages_by_type`` counts received messages by their ``type`` field; ``points`` counts
    metric values received; ``rejected_by_reason`` counts frames answered with an error, by the
    error code; ``decision_latency`` times from a record's arrival to the decision it caused;
    ``ingest_lag_seconds`` is how far the slowest job's last record lags its arrival;
    ``jobs_by_state`` counts jobs per state (states not listed are exported as 0).
    """

    connections: int = 0
    messages_by_type: Mapping[str, int] = field(default_factory=dict)
    points: int = 0
    rejected_by_reason: Mapping[str, int] = field(default_factory=dict)
    decision_latency: HistogramView = field(default_factory=HistogramView)
    ingest_lag_seconds: float = 0.0
    reloads_ok: int = 0
    reloads_error: int = 0
    jobs_by_state: Mapping[str, int] = field(default_factory=dict)


def expired(view: JobView, now: float, ttl: float) -> bool:
    """True when a finished or halted job was last seen more than ``ttl`` seconds before ``now``.

    ``now`` is a Unix timestamp, like ``view.last_seen``. The daemon drops such jobs from the
    views it hands in, so that their series disappear from the export.
    """
    if view.state not in _ENDED_STATES:
        return False
    return view.last_seen is None or now - view.last_seen > ttl


def min_lr_ratios(lrs: tuple[float, ...], min_lrs: tuple[float, ...]) -> list[float]:
    """Each group's learning rate divided by its floor; +Inf where there is no floor (0)."""
    ratios = []
    for index, lr in enumerate(lrs):
        floor = min_lrs[index] if index < len(min_lrs) else 0.0
        ratios.append(lr / floor if floor > 0 else math.inf)
    return ratios


# --------------------------------------------------------------------------------------------
# Families
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Family:
    name: str  # the exposed name (counters include _total)
    type: str
    help: str


_LR = _Family("lrpilot_job_learning_rate", "gauge", "Learning rate of each param group.")
_RATIO = _Family(
    "lrpilot_job_min_lr_ratio",
    "gauge",
    "Learning rate divided by the policy's min_lr floor (+Inf without a floor).",
)
_VALUE = _Family(
    "lrpilot_job_metric_value", "gauge", "Last reported value of each metric (NaN kept)."
)
_NONFINITE = _Family(
    "lrpilot_job_nonfinite_total", "counter", "NaN or infinite values reported, per metric."
)
_DETECTIONS = _Family("lrpilot_job_detections_total", "counter", "Detections fired, per detector.")
_DECISIONS = _Family(
    "lrpilot_job_decisions_total",
    "counter",
    "Decisions sent to the job, per kind and reason (the detector, policy or operator).",
)
_BAD_EVALS = _Family(
    "lrpilot_job_plateau_bad_evaluations",
    "gauge",
    "Evaluations since the monitored metric last improved (plateau policies).",
)
_LAST_SEEN = _Family(
    "lrpilot_job_last_seen_timestamp_seconds",
    "gauge",
    "Unix time of the last message from the job.",
)
_STEP = _Family("lrpilot_job_step", "gauge", "Largest step reported by any rank.")
_STATE = _Family(
    "lrpilot_job_state",
    "gauge",
    "1 for the job's current state (running, stale, finished, halted).",
)
_JOB_FAMILIES: Final = (
    _LR,
    _RATIO,
    _VALUE,
    _NONFINITE,
    _DETECTIONS,
    _DECISIONS,
    _BAD_EVALS,
    _LAST_SEEN,
    _STEP,
    _STATE,
)

_CONNECTIONS = _Family("lrpilot_connections", "gauge", "Open websocket connections.")
_MESSAGES = _Family(
    "lrpilot_messages_received_total", "counter", "Messages received, by message type."
)
_POINTS = _Family("lrpilot_points_received_total", "counter", "Metric values received.")
_REJECTED = _Family(
    "lrpilot_frames_rejected_total", "counter", "Frames answered with an error, by error code."
)
_LATENCY = _Family(
    "lrpilot_decision_latency_seconds",
    "histogram",
    "Time from a record's arrival to the decision it caused.",
)
_LAG = _Family(
    "lrpilot_ingest_lag_seconds", "gauge", "How far behind arrival the slowest job's records are."
)
_RELOADS = _Family(
    "lrpilot_config_reloads_total", "counter", "Configuration reloads, by result (ok, error)."
)
_JOBS = _Family("lrpilot_jobs", "gauge", "Jobs known to the daemon, by state.")
_BUILD = _Family("lrpilot_build_info", "gauge", "Always 1; the version label says which build.")


def _counter_base(family: _Family) -> str:
    """prometheus_client wants a counter's name without the _total suffix."""
    return family.name.removesuffix("_total")


# --------------------------------------------------------------------------------------------
# prometheus_client collector
# --------------------------------------------------------------------------------------------


class LrpilotCollector:
    """Yields lrpilot's metric families from the daemon's state whenever it is collected.

    ``jobs`` and ``stats`` are called once per collection. Register it with a
    ``prometheus_client`` registry, or hand it to :class:`MetricsRenderer`.
    """

    def __init__(
        self,
        jobs: Callable[[], Iterable[JobView]],
        stats: Callable[[], DaemonStatsView] | None = None,
        *,
        version: str = __version__,
    ) -> None:
        self.jobs = jobs
        self.stats = stats
        self.version = version

    def collect(self) -> Iterator[Metric]:
        """The metric families, for ``prometheus_client``'s registry."""
        views = list(self.jobs())
        tj = "training_job"
        lr = GaugeMetricFamily(_LR.name, _LR.help, labels=[tj, "param_group"])
        ratio = GaugeMetricFamily(_RATIO.name, _RATIO.help, labels=[tj, "param_group"])
        value = GaugeMetricFamily(_VALUE.name, _VALUE.help, labels=[tj, "metric"])
        nonfinite = CounterMetricFamily(
            _counter_base(_NONFINITE), _NONFINITE.help, labels=[tj, "metric"]
        )
        detections = CounterMetricFamily(
            _counter_base(_DETECTIONS), _DETECTIONS.help, labels=[tj, "detector"]
        )
        decisions = CounterMetricFamily(
            _counter_base(_DECISIONS), _DECISIONS.help, labels=[tj, "kind", "reason"]
        )
        bad = GaugeMetricFamily(_BAD_EVALS.name, _BAD_EVALS.help, labels=[tj])
        seen = GaugeMetricFamily(_LAST_SEEN.name, _LAST_SEEN.help, labels=[tj])
        step = GaugeMetricFamily(_STEP.name, _STEP.help, labels=[tj])
        state = GaugeMetricFamily(_STATE.name, _STATE.help, labels=[tj, "state"])
        for view in views:
            name = view.name
            for group, x in enumerate(view.lrs):
                lr.add_metric([name, str(group)], x)
            for group, x in enumerate(min_lr_ratios(view.lrs, view.min_lrs)):
                ratio.add_metric([name, str(group)], x)
            for metric, x in view.metric_values.items():
                value.add_metric([name, metric], x)
            for metric, n in _with_zeros(view.nonfinite, view.metric_values).items():
                nonfinite.add_metric([name, metric], n)
            for detector, n in view.detections.items():
                detections.add_metric([name, detector], n)
            for (kind, reason), n in view.decisions.items():
                decisions.add_metric([name, kind, reason], n)
            if view.plateau_bad_evaluations is not None:
                bad.add_metric([name], view.plateau_bad_evaluations)
            if view.last_seen is not None:
                seen.add_metric([name], round(view.last_seen, 3))  # as _number_templates
            if view.step is not None:
                step.add_metric([name], view.step)
            for s in JOB_STATES:
                state.add_metric([name, s], 1.0 if s == view.state else 0.0)
        yield from (lr, ratio, value, nonfinite, detections, decisions, bad, seen, step, state)

        if self.stats is not None:
            stats = self.stats()
            yield GaugeMetricFamily(_CONNECTIONS.name, _CONNECTIONS.help, value=stats.connections)
            messages = CounterMetricFamily(
                _counter_base(_MESSAGES), _MESSAGES.help, labels=["type"]
            )
            for kind, n in stats.messages_by_type.items():
                messages.add_metric([kind], n)
            yield messages
            yield CounterMetricFamily(_counter_base(_POINTS), _POINTS.help, value=stats.points)
            rejected = CounterMetricFamily(
                _counter_base(_REJECTED), _REJECTED.help, labels=["reason"]
            )
            for reason, n in stats.rejected_by_reason.items():
                rejected.add_metric([reason], n)
            yield rejected
            hist = stats.decision_latency
            yield HistogramMetricFamily(
                _LATENCY.name,
                _LATENCY.help,
                buckets=[(floatToGoString(b), n) for b, n in _complete_buckets(hist)],
                sum_value=hist.sum,
            )
            yield GaugeMetricFamily(_LAG.name, _LAG.help, value=stats.ingest_lag_seconds)
            reloads = CounterMetricFamily(_counter_base(_RELOADS), _RELOADS.help, labels=["result"])
            reloads.add_metric(["ok"], stats.reloads_ok)
            reloads.add_metric(["error"], stats.reloads_error)
            yield reloads
            jobs = GaugeMetricFamily(_JOBS.name, _JOBS.help, labels=["state"])
            for s, n in _job_counts(stats.jobs_by_state):
                jobs.add_metric([s], n)
            yield jobs
        build = GaugeMetricFamily(_BUILD.name, _BUILD.help, labels=["version"])
        build.add_metric([self.version], 1.0)
        yield build


def _with_zeros(counts: Mapping[str, int], names: Iterable[str]) -> dict[str, int]:
    out = dict.fromkeys(names, 0)
    out.update(counts)
    return out


def _complete_buckets(hist: HistogramView) -> list[tuple[float, int]]:
    buckets = list(hist.buckets)
    if not buckets or not math.isinf(buckets[-1][0]):
        buckets.append((math.inf, hist.count))
    return buckets


def _job_counts(by_state: Mapping[str, int]) -> list[tuple[str, int]]:
    counts = dict.fromkeys(JOB_STATES, 0)
    counts.update(by_state)
    return list(counts.items())


# --------------------------------------------------------------------------------------------
# Text exposition, written directly
# --------------------------------------------------------------------------------------------

_GO_FLOATS: Final = {"nan": "NaN", "inf": "+Inf", "-inf": "-Inf"}


def _number(x: float) -> str:
    """A sample value as Prometheus writes it: NaN, +Inf, -Inf or the shortest repr."""
    text = repr(x)
    return _GO_FLOATS.get(text, text)


def _escape_label(value: str) -> str:
    """Escape a label value for the text format (backslash, double quote, newline)."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class _Escapes(dict[str, str]):
    """Label value -> escaped label value; computed once per distinct string."""

    def __missing__(self, key: str) -> str:
        escaped = _escape_label(key)
        self[key] = escaped
        return escaped


def _header(family: _Family) -> str:
    help_text = family.help.replace("\\", "\\\\").replace("\n", "\\n")
    return f"# HELP {family.name} {help_text}\n# TYPE {family.name} {family.type}\n"


_HEADERS: Final = {f.name: _header(f) for f in (*_JOB_FAMILIES, _CONNECTIONS, _MESSAGES, _POINTS, _REJECTED, _LATENCY, _LAG, _RELOADS, _JOBS, _BUILD)}  # fmt: skip


# For each current state, the job's lrpilot_job_state lines with "{0}" for the job label.
_STATE_TEMPLATES: Final = {
    current: "".join(
        f'{_STATE.name}{{training_job="{{0}}",state="{s}"}} {1 if s == current else 0}\n'
        for s in JOB_STATES
    )
    for current in JOB_STATES
}


#: the templates of the value, plateau, last-seen and step sections (see RenderMemo), and
#: how many plateau, last-seen and step numbers they take
_Templates = tuple[bytes, bytes, bytes, bytes, tuple[int, int, int]]


class RenderMemo:
    """What :func:`render_text` keeps between renders to do less work the next time.

    ``escapes`` maps label values to their escaped form. ``jobs`` holds, per job name, a
    :class:`_JobLines`: the lines of the job's rarely changing families (learning rates,
    counters, state) with what they were rendered from, its ``steady`` token, and the template
    of its metric values. ``order`` lists the jobs' lines in the order of the last render,
    ``names``, ``views``, ``steadies`` and ``stamps`` the views it was made from, their names,
    tokens and stamps;
    ``sections`` holds each job family's lines of all jobs (in UTF-8), and ``templates`` the
    text of the often changing families (metric values, plateau, last-seen and step, in
    UTF-8) with ``%a`` for every number (``%.3f`` for last-seen times), and how many plateau,
    last-seen and step numbers
    they take (when every job has one, the numbers are read without looking for None).

    * When every view is the one of the last render, with the same ``stamp`` (see
      :class:`JobView`), nothing is looked at again. When every
      view carries the token its position carried last time (``tokened``: none was None),
      the jobs are the same, in the same order, and only their numbers moved: no name is
      read and no line looked at.
    * When the views are of the same jobs in the same order as last time (one comparison of
      two lists of names), they are matched by position. Only views whose token is None or
      differs from the last one have their learning-rate, counter and state lines looked at:
      those are rendered again when what they were rendered from differs from the view's,
      compared as whole tuples and dicts (one C-level comparison each). A view with the same
      token as last time is not looked at (see :class:`JobView`).
    * Otherwise every view's lines are looked up by name, made for a new job, brought up to
      date for a known one; jobs that are gone are forgotten.
    * When any view is not the *same object* with the same stamp as last time (the daemon
      hands out a job's previous :class:`JobView` again until something of that job
      changes, renewed when only its numbers did), the sections of
      the often changing families are formatted again from their templates in one ``%``
      each, with the numbers of every view gathered by C-level iteration: names and labels
      were escaped once, only the numbers are written. A template is made again when the
      jobs, their order, a job's metric names or which of its optional series exist
      changed. A rarely changing family's section is joined again only when one of its jobs'
      lines changed.

    A render that fails half-way leaves no section or template to trust: the next one looks
    every view up by name and makes them all.
    """

    __slots__ = (
        "escapes", "generation", "jobs", "names", "order", "sections", "stamps", "steadies",
        "templates", "tokened", "views",
    )  # fmt: skip

    def __init__(self) -> None:
        self.escapes: _Escapes = _Escapes()
        self.jobs: dict[str, _JobLines] = {}
        self.order: list[_JobLines] = []
        self.names: list[str] = []
        self.views: list[JobView] = []
        self.steadies: list[object] = []
        self.stamps: list[object] = []
        self.sections: list[bytes] | None = None
        self.tokened = False
        self.templates: _Templates | None = None
        self.generation = 0


# Bit i of a change mask stands for the section of _JOB_FAMILIES[i], _TEMPLATES_BIT for the
# templates of the families whose numbers change often.
_TEMPLATES_BIT: Final = 1 << len(_JOB_FAMILIES)
_ALL_BITS: Final = (1 << (len(_JOB_FAMILIES) + 1)) - 1
_LR_BIT, _RATIO_BIT, _VALUE_BIT, _NONFINITE_BIT, _DETECTIONS_BIT, _DECISIONS_BIT, _BAD_BIT, _SEEN_BIT, _STEP_BIT, _STATE_BIT = (1 << i for i in range(len(_JOB_FAMILIES)))  # fmt: skip
_VALUE_AT, _BAD_AT, _SEEN_AT, _STEP_AT = (_JOB_FAMILIES.index(f) for f in (_VALUE, _BAD_EVALS, _LAST_SEEN, _STEP))  # fmt: skip
#: the families whose numbers change often: formatted from templates whenever a view is new
_NUMBER_BITS: Final = _VALUE_BIT | _BAD_BIT | _SEEN_BIT | _STEP_BIT
#: the other families: per section index, the _JobLines attribute with a job's lines
_LINES_OF: Final = {
    _JOB_FAMILIES.index(family): attrgetter(name)
    for family, name in (
        (_LR, "lr"),
        (_RATIO, "ratio"),
        (_NONFINITE, "nonfinite"),
        (_DETECTIONS, "detections"),
        (_DECISIONS, "decisions"),
        (_STATE, "state"),
    )
}
_JOB_HEADERS: Final = tuple(_HEADERS[f.name].encode() for f in _JOB_FAMILIES)
# attribute getters for C-level passes over all views (map, chain, filter)
_NAME: Final = attrgetter("name")
_STEADY: Final = attrgetter("steady")
_STAMP: Final = attrgetter("stamp")
_METRIC_VALUES: Final = attrgetter("metric_values")
_VALUES_OF: Final = methodcaller("values")
_DICT_VALUES: Final = dict.values
_BAD: Final = attrgetter("plateau_bad_evaluations")
_SEEN: Final = attrgetter("last_seen")
_STEP_OF: Final = attrgetter("step")
_IS_NOT_NONE: Final = partial(is_not, None)


class _JobLines:
    """One job's lines of the rarely changing families, the template of its metric values and
    which of its optional series (plateau count, last seen, step) exist.

    Sample values are written with repr() (or %r), which spells non-finite floats
    nan/inf/-inf; :func:`render_text` rewrites them once per section (:func:`_fix_non_finite`).
    """

    __slots__ = (
        "decisions", "decisions_from", "detections", "detections_from", "generation",
        "has_bad", "has_seen", "has_step", "job", "lr", "lr_from", "nonfinite",
        "nonfinite_from", "prefix", "ratio", "state", "state_from", "steady", "value_names",
        "value_template", "view",
    )  # fmt: skip

    def __init__(self, view: JobView, esc: _Escapes) -> None:
        self.generation = 0
        self.job = job = esc[view.name]
        self.prefix = f'{{training_job="{job}",'
        self.lr_from: tuple[tuple[float, ...], tuple[float, ...]] | None = None
        self.nonfinite_from: dict[str, int] | None = None
        self.detections_from: dict[str, int] | None = None
        self.decisions_from: dict[tuple[str, str], int] | None = None
        self.state_from: str | None = None
        self.value_names: tuple[str, ...] | None = None
        self.has_bad = self.has_seen = self.has_step = False
        self.steady: object = None
        self.update(view, esc)

    def update(self, view: JobView, esc: _Escapes) -> int:
        """Render the lines that differ from what ``view`` gives; returns the change mask.
        ``self.view`` is set last: an update that failed half-way is done again next time."""
        changed = _NUMBER_BITS
        lrs, min_lrs = view.lrs, view.min_lrs
        lr_from = self.lr_from
        if lr_from is None or lr_from[0] != lrs or lr_from[1] != min_lrs:
            self.lr, self.ratio = _lr_lines(self.prefix, lrs, min_lrs)
            self.lr_from = (lrs, min_lrs)
            changed |= _LR_BIT | _RATIO_BIT

        names = tuple(view.metric_values)
        names_changed = names != self.value_names
        if names_changed:
            head = f"{_VALUE.name}{self.prefix}metric=".replace("%", "%%")  # as a % template
            self.value_template = "".join(
                [f'{head}"{esc[metric].replace("%", "%%")}"}} %a\n' for metric in names]
            )
            self.value_names = names
            changed |= _TEMPLATES_BIT

        nonfinite = view.nonfinite
        if names_changed or nonfinite != self.nonfinite_from:
            self.nonfinite = _counter_lines(
                f"{_NONFINITE.name}{self.prefix}metric=",
                _with_zeros(nonfinite, names).items(),
                esc,
            )
            self.nonfinite_from = dict(nonfinite)
            changed |= _NONFINITE_BIT
        detections = view.detections
        if detections != self.detections_from:
            self.detections = _counter_lines(
                f"{_DETECTIONS.name}{self.prefix}detector=", detections.items(), esc
            )
            self.detections_from = dict(detections)
            changed |= _DETECTIONS_BIT
        decisions = view.decisions
        if decisions != self.decisions_from:
            head = f"{_DECISIONS.name}{self.prefix}kind="
            self.decisions = "".join(
                [
                    f'{head}"{esc[kind]}",reason="{esc[reason]}"}} {n!r}\n'
                    for (kind, reason), n in decisions.items()
                ]
            )
            self.decisions_from = dict(decisions)
            changed |= _DECISIONS_BIT

        has = (
            view.plateau_bad_evaluations is not None,
            view.last_seen is not None,
            view.step is not None,
        )
        if has != (self.has_bad, self.has_seen, self.has_step):
            self.has_bad, self.has_seen, self.has_step = has
            changed |= _TEMPLATES_BIT

        state = view.state
        if state != self.state_from:
            self.state = _STATE_TEMPLATES[state].replace("{0}", self.job)
            self.state_from = state
            changed |= _STATE_BIT
        self.steady = view.steady
        self.view = view
        return changed


def render_text(collector: LrpilotCollector, memo: RenderMemo | None = None) -> str:
    """The text exposition (0.0.4) of everything ``collector`` exports."""
    return _render_bytes(collector, memo).decode()


def _render_bytes(
    collector: LrpilotCollector,
    memo: RenderMemo | None = None,
    head: Callable[[int], bytes] | None = None,
) -> bytes:
    """:func:`render_text` in UTF-8, for :class:`MetricsRenderer`: the sections are kept
    encoded and joined once. The body of 1,000 jobs is 1.4 MB; joining text and encoding it
    held two such buffers at once, and fresh memory of that size costs page faults at every
    scrape (1.2 ms for join and encode against 0.1 ms for this join, here). With ``head``,
    ``head(len(body))`` goes in front of the body in the same join (an HTTP response's status
    line and headers: see :meth:`MetricsRenderer.render_with_head`)."""
    if memo is None:
        memo = RenderMemo()
    esc = memo.escapes
    if len(esc) > 100_000:  # job names come and go; keep the cache bounded
        esc.clear()
    sections, templates, order = memo.sections, memo.templates, memo.order
    memo.sections = memo.templates = None  # until this render is complete
    views = list(collector.jobs())  # a copy: the memo keeps it, the collector may reuse its list
    last = memo.views
    warm = len(views) == len(last)
    # the views' stamps (see JobView): the memo keeps the last ones, so that no stamp object
    # of the last render can be freed and its address taken by a new one
    stamps = list(map(_STAMP, views))
    if (
        sections is not None
        and templates is not None
        and warm
        and all(map(is_, views, last))
        and all(map(is_, stamps, memo.stamps))
    ):
        # every view is the one of the last render (same job, same numbers): nothing to do
        changed = 0
        names, steadies, tokened = memo.names, memo.steadies, memo.tokened
    else:
        steadies = list(map(_STEADY, views))
        if (
            sections is not None
            and templates is not None
            and warm
            and memo.tokened
            and all(map(is_, steadies, memo.steadies))
        ):
            # every job kept its token: the same jobs in the same order (a token is of one
            # job), and only their numbers moved (see JobView.steady); no name is read
            changed = _NUMBER_BITS
            names, tokened = memo.names, True
        else:
            names = list(map(_NAME, views))
            tokened = None not in steadies
            if sections is None or templates is None or names != memo.names:
                order = _match(views, memo)
                sections = [b""] * len(_JOB_FAMILIES)
                changed = _ALL_BITS
            else:
                changed = _NUMBER_BITS | _take(views, order, steadies, memo.steadies, esc)
    if changed:
        sections = list(sections)
        for at, lines_of in _LINES_OF.items():
            if changed >> at & 1:
                sections[at] = _fix_non_finite("".join(map(lines_of, order))).encode()
        if changed & _TEMPLATES_BIT or templates is None:
            templates = _number_templates(order)
        value, bad, seen, step, counts = templates
        n_bad, n_seen, n_step = counts
        sections[_VALUE_AT] = _format(value, _metric_values(views))
        sections[_BAD_AT] = _format(bad, _optional_numbers(_BAD, views, n_bad))
        sections[_SEEN_AT] = _format(seen, _optional_numbers(_SEEN, views, n_seen))
        sections[_STEP_AT] = _format(step, _optional_numbers(_STEP_OF, views, n_step))
    memo.order, memo.names, memo.views, memo.steadies = order, names, views, steadies
    memo.stamps = stamps
    memo.tokened = tokened
    memo.sections, memo.templates = sections, templates

    parts = [text for pair in zip(_JOB_HEADERS, sections, strict=True) for text in pair]
    if collector.stats is not None:
        parts.append(_render_stats(collector.stats(), esc).encode())
    parts.append(
        f'{_HEADERS[_BUILD.name]}{_BUILD.name}{{version="{esc[collector.version]}"}} 1.0\n'.encode()
    )
    if head is not None:
        parts.insert(0, head(sum(map(len, parts))))
    return b"".join(parts)


def _match(views: list[JobView], memo: RenderMemo) -> list[_JobLines]:
    """Each view's lines, made or brought up to date, when the jobs or their order changed
    since the last render (or it failed): looked up by name, the rest forgotten."""
    esc = memo.escapes
    known = memo.jobs
    memo.generation = generation = memo.generation + 1
    jobs: dict[str, _JobLines] = {}
    order: list[_JobLines] = []
    for view in views:
        lines = known.get(view.name)
        if lines is None or lines.generation == generation:  # new, or a second view of a name
            lines = _JobLines(view, esc)
        elif lines.view is not view:
            steady = view.steady
            if steady is None or steady is not lines.steady:
                lines.update(view, esc)
        lines.generation = generation
        jobs[view.name] = lines
        order.append(lines)
    memo.jobs = jobs
    return order


def _take(
    views: list[JobView],
    order: list[_JobLines],
    steadies: list[object],
    last_steadies: list[object],
    esc: _Escapes,
) -> int:
    """Bring the lines of ``order`` up to ``views``, of the same jobs in the same order as
    last time; returns the change mask of their lines and templates.

    Only the views without a token or with another one than last time are looked at (their
    positions are found by C-level iteration): a scrape of 1,000 jobs that all reported
    since the last one, each keeping its token, runs no Python code per job here.
    """
    changed = 0
    positions = range(len(views))
    for i in compress(positions, map(is_not, steadies, last_steadies)):
        changed |= order[i].update(views[i], esc)
    if None in steadies:
        for i in compress(positions, map(is_, steadies, repeat(None))):
            lines, view = order[i], views[i]
            if view is not lines.view:
                changed |= lines.update(view, esc)
    return changed


def _metric_values(views: list[JobView]) -> tuple[float, ...]:
    """Every view's metric values in order, gathered by C-level iteration (``dict.values``
    called directly costs half of ``methodcaller("values")``; any other mapping works too)."""
    try:
        return tuple(chain.from_iterable(map(_DICT_VALUES, map(_METRIC_VALUES, views))))
    except TypeError:  # a mapping that is not a dict
        return tuple(chain.from_iterable(map(_VALUES_OF, map(_METRIC_VALUES, views))))


def _optional_numbers(
    get: Callable[[JobView], float | None], views: list[JobView], count: int
) -> tuple[float, ...]:
    """The numbers ``get`` reads from the views, those that are None left out; ``count`` is
    how many the template expects: when every view has one, none is looked at twice."""
    if count == len(views):
        return tuple(map(get, views))  # type: ignore[arg-type]
    return tuple(filter(_IS_NOT_NONE, map(get, views)))  # type: ignore[arg-type]


def _format(template: bytes, numbers: tuple[float, ...]) -> bytes:
    """``template % numbers`` with non-finite values spelled as Prometheus does. A finite sum
    means every number is finite: the text is then not searched for nan or inf.

    The template is UTF-8 with ``%a`` for each number, which bytes formatting writes as the
    number's repr (``ascii()``, the same for numbers). Bytes formatting finds the next ``%``
    with memchr and copies the text in between in one piece, where str formatting looks at
    every character: with ~300 kB of text around 5,000 numbers, that is a third of the time
    the numbers' own formatting leaves (and the text needs no encoding afterwards)."""
    text = template % numbers
    try:
        if math.isfinite(sum(numbers)):
            return text
    except OverflowError:  # ints too large for a float
        pass
    return _fix_non_finite_bytes(text)


def _number_templates(order: list[_JobLines]) -> _Templates:
    """The value, plateau, last-seen and step sections of ``order`` in UTF-8 with %a for each
    number, %.3f for a last-seen time (a job without a plateau, last-seen or step number has
    no line there), and how many plateau, last-seen and step lines there are."""
    value, bad, seen, step = [], [], [], []
    for lines in order:
        # '%' is the only character of a template that % itself would read
        head = f'{{training_job="{lines.job}"}} '.replace("%", "%%")
        value.append(lines.value_template)
        if lines.has_bad:
            bad.append(f"{_BAD_EVALS.name}{head}%a\n")
        if lines.has_seen:
            # to the millisecond: the shortest repr of a full-precision Unix time costs ~1 µs,
            # three times this fixed-point form, and a scrape writes one per job
            seen.append(f"{_LAST_SEEN.name}{head}%.3f\n")
        if lines.has_step:
            step.append(f"{_STEP.name}{head}%a\n")
    counts = (len(bad), len(seen), len(step))
    value_text, bad_text, seen_text, step_text = map("".join, (value, bad, seen, step))
    return (
        value_text.encode(),
        bad_text.encode(),
        seen_text.encode(),
        step_text.encode(),
        counts,
    )


def _lr_lines(prefix: str, lrs: tuple[float, ...], min_lrs: tuple[float, ...]) -> tuple[str, str]:
    """The learning-rate and min-LR-ratio lines of one job."""
    lr_lines = []
    ratio_lines = []
    for group, x in enumerate(lrs):
        lr_lines.append(f'{_LR.name}{prefix}param_group="{group}"}} {x!r}\n')
        floor = min_lrs[group] if group < len(min_lrs) else 0.0
        ratio = x / floor if floor > 0 else math.inf
        ratio_lines.append(f'{_RATIO.name}{prefix}param_group="{group}"}} {ratio!r}\n')
    return "".join(lr_lines), "".join(ratio_lines)


def _counter_lines(head: str, counts: Iterable[tuple[str, int]], esc: _Escapes) -> str:
    """One line per ``(label value, count)``; ``head`` ends with the label's ``name=``."""
    return "".join([f'{head}"{esc[label]}"}} {n!r}\n' for label, n in counts])


def _fix_non_finite(text: str) -> str:
    """Rewrite Python's nan/inf/-inf sample values as Prometheus' NaN/+Inf/-Inf.

    A value is the only place where " nan" can precede a raw newline: label values have
    their newlines escaped.
    """
    if " nan\n" in text:
        text = text.replace(" nan\n", " NaN\n")
    if "inf\n" in text:
        text = text.replace(" inf\n", " +Inf\n").replace(" -inf\n", " -Inf\n")
    return text


def _fix_non_finite_bytes(text: bytes) -> bytes:
    """:func:`_fix_non_finite` for UTF-8 text."""
    if b" nan\n" in text:
        text = text.replace(b" nan\n", b" NaN\n")
    if b"inf\n" in text:
        text = text.replace(b" inf\n", b" +Inf\n").replace(b" -inf\n", b" -Inf\n")
    return text


def _render_stats(stats: DaemonStatsView, esc: dict[str, str]) -> str:
    num = _number
    out = [_HEADERS[_CONNECTIONS.name], f"{_CONNECTIONS.name} {num(float(stats.connections))}\n"]
    out.append(_HEADERS[_MESSAGES.name])
    out += [f'{_MESSAGES.name}{{type="{esc[t]}"}} {n}\n' for t, n in stats.messages_by_type.items()]
    out += [_HEADERS[_POINTS.name], f"{_POINTS.name} {stats.points}\n"]
    out.append(_HEADERS[_REJECTED.name])
    out += [
        f'{_REJECTED.name}{{reason="{esc[r]}"}} {n}\n' for r, n in stats.rejected_by_reason.items()
    ]
    out.append(_HEADERS[_LATENCY.name])
    hist = stats.decision_latency
    out += [
        f'{_LATENCY.name}_bucket{{le="{floatToGoString(b)}"}} {n}\n'
        for b, n in _complete_buckets(hist)
    ]
    out.append(f"{_LATENCY.name}_count {hist.count}\n{_LATENCY.name}_sum {num(float(hist.sum))}\n")
    out += [_HEADERS[_LAG.name], f"{_LAG.name} {num(float(stats.ingest_lag_seconds))}\n"]
    out.append(_HEADERS[_RELOADS.name])
    out.append(f'{_RELOADS.name}{{result="ok"}} {stats.reloads_ok}\n')
    out.append(f'{_RELOADS.name}{{result="error"}} {stats.reloads_error}\n')
    out.append(_HEADERS[_JOBS.name])
    out += [f'{_JOBS.name}{{state="{esc[s]}"}} {n}\n' for s, n in _job_counts(stats.jobs_by_state)]
    return "".join(out)


class MetricsRenderer:
    """Serves ``render_text(collector)`` as bytes, re-rendering at most every ``cache_seconds``.

    A scrape that arrives within ``cache_seconds`` of the last render gets the same bytes, so
    that several Prometheus servers (or a dashboard polling /metrics) cost one render.
    Thread-safe; ``clock`` is injectable for tests.
    """

    def __init__(
        self,
        collector: LrpilotCollector,
        cache_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if cache_seconds < 0 or not math.isfinite(cache_seconds):
            raise ValueError(f"cache_seconds: must be a finite number >= 0, got {cache_seconds!r}")
        self.collector = collector
        self.cache_seconds = cache_seconds
        self.clock = clock
        self.content_type = CONTENT_TYPE
        self._lock = threading.Lock()
        self._cached: bytes | None = None
        self._cached_head: Callable[[int], bytes] | None = None
        self._rendered_at = -math.inf
        self._memo = RenderMemo()

    def render(self) -> bytes:
        """The exposition text, from the cache when it is younger than ``cache_seconds``."""
        return self._render(None)

    def render_with_head(self, head: Callable[[int], bytes]) -> bytes:
        """``head(len(body)) + body`` built in one buffer, cached like :meth:`render`.

        The daemon passes the function that writes its HTTP status line and headers, and
        sends the result as it is: otherwise the 1.4 MB body of 1,000 jobs was copied once
        more behind its headers, into fresh memory whose page faults cost more than the
        copy, at every scrape. A render for another ``head`` (or for :meth:`render`) does not
        reuse the cache.
        """
        return self._render(head)

    def _render(self, head: Callable[[int], bytes] | None) -> bytes:
        with self._lock:
            now = self.clock()
            if (
                self._cached is not None
                and self._cached_head == head
                and now - self._rendered_at < self.cache_seconds
            ):
                return self._cached
            self._cached = _render_bytes(self.collector, self._memo, head)
            self._cached_head = head
            self._rendered_at = now
            return self._cached

    def invalidate(self) -> None:
        """Forget the cached text; the next :meth:`render` renders afresh."""
        with self._lock:
            self._cached = None

"""The Prometheus exporter: values, escaping, text format validity and the render cache."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from monitor.exporter import (
    CONTENT_TYPE,
    JOB_STATES,
    DaemonStatsView,
    HistogramView,
    JobView,
    LrpilotCollector,
    MetricsRenderer,
    RenderMemo,
    expired,
    render_text,
)

from ._daemon import Client, make_config, running

NASTY_NAME = 'run "a"\\b\nnext'


def job(name: str = "mnist-a", **overrides: object) -> JobView:
    fields: dict[str, object] = {
        "name": name,
        "state": "running",
        "lrs": (0.1, 0.01),
        "min_lrs": (0.001,),
        "metric_values": {"loss": math.nan, "val_loss": 0.25},
        "detections": {"plateau": 2, "spike": 0},
        "decisions": {("set_lr", "reduce_on_plateau"): 3, ("halt", "operator"): 1},
        "nonfinite": {"loss": 4},
        "plateau_bad_evaluations": 5,
        "last_seen": 1_700_000_000.5,
        "step": 1200,
    }
    fields.update(overrides)
    return JobView(**fields)  # type: ignore[arg-type]


STATS = DaemonStatsView(
    connections=3,
    messages_by_type={"hello": 2, "metrics": 40},
    points=400,
    rejected_by_reason={"bad_json": 1, "unauthorized": 2},
    decision_latency=HistogramView(buckets=((0.001, 3), (0.01, 5)), sum=0.02, count=6),
    ingest_lag_seconds=0.5,
    reloads_ok=2,
    reloads_error=1,
    jobs_by_state={"running": 1, "halted": 1},
)


def registry_for(
    views: Iterable[JobView], stats: DaemonStatsView | None = STATS
) -> CollectorRegistry:
    registry = CollectorRegistry()
    frozen = list(views)
    registry.register(LrpilotCollector(lambda: frozen, (lambda: stats) if stats else None))
    return registry


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition text, keyed by name and sorted labels."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def same_values(
    a: dict[tuple[str, tuple[tuple[str, str], ...]], float],
    b: dict[tuple[str, tuple[tuple[str, str], ...]], float],
) -> bool:
    return a.keys() == b.keys() and all(
        (math.isnan(a[k]) and math.isnan(b[k])) or a[k] == b[k] for k in a
    )


def test_per_job_values_read_back_from_a_fresh_registry() -> None:
    """Each catalogue series of a job carries the view's value under training_job."""
    reg = registry_for([job()])
    get = reg.get_sample_value
    tj = {"training_job": "mnist-a"}
    assert get("lrpilot_job_learning_rate", {**tj, "param_group": "0"}) == 0.1
    assert get("lrpilot_job_learning_rate", {**tj, "param_group": "1"}) == 0.01
    assert get("lrpilot_job_min_lr_ratio", {**tj, "param_group": "0"}) == pytest.approx(100.0)
    assert get("lrpilot_job_min_lr_ratio", {**tj, "param_group": "1"}) == math.inf
    assert get("lrpilot_job_metric_value", {**tj, "metric": "val_loss"}) == 0.25
    assert get("lrpilot_job_nonfinite_total", {**tj, "metric": "loss"}) == 4
    assert get("lrpilot_job_detections_total", {**tj, "detector": "plateau"}) == 2
    assert get("lrpilot_job_detections_total", {**tj, "detector": "spike"}) == 0
    key = {**tj, "kind": "set_lr", "reason": "reduce_on_plateau"}
    assert get("lrpilot_job_decisions_total", key) == 3
    assert get("lrpilot_job_plateau_bad_evaluations", tj) == 5
    assert get("lrpilot_job_last_seen_timestamp_seconds", tj) == 1_700_000_000.5
    assert get("lrpilot_job_step", tj) == 1200
    assert get("lrpilot_job_state", {**tj, "state": "running"}) == 1
    for state in ("stale", "finished", "halted"):
        assert get("lrpilot_job_state", {**tj, "state": state}) == 0


def test_nan_metric_value_is_exported_as_nan() -> None:
    """A NaN last value stays NaN in the export instead of being dropped or zeroed."""
    value = registry_for([job()]).get_sample_value(
        "lrpilot_job_metric_value", {"training_job": "mnist-a", "metric": "loss"}
    )
    assert value is not None and math.isnan(value)
    assert 'metric="loss"} NaN\n' in render_text(LrpilotCollector(lambda: [job()]))


def test_nonfinite_counter_is_zero_for_every_reported_metric() -> None:
    """A metric that never went NaN still has a nonfinite series at 0, so increase() sees the first."""
    value = registry_for([job()]).get_sample_value(
        "lrpilot_job_nonfinite_total", {"training_job": "mnist-a", "metric": "val_loss"}
    )
    assert value == 0


def test_optional_job_series_are_absent_before_the_first_record() -> None:
    """Step, last-seen and plateau counters are left out while the view has no value for them."""
    reg = registry_for([job(step=None, last_seen=None, plateau_bad_evaluations=None)])
    tj = {"training_job": "mnist-a"}
    assert reg.get_sample_value("lrpilot_job_step", tj) is None
    assert reg.get_sample_value("lrpilot_job_last_seen_timestamp_seconds", tj) is None
    assert reg.get_sample_value("lrpilot_job_plateau_bad_evaluations", tj) is None
    assert reg.get_sample_value("lrpilot_job_state", {**tj, "state": "running"}) == 1


def test_daemon_series_read_back() -> None:
    """Daemon counters, the latency histogram (with its +Inf bucket) and job counts are exported."""
    reg = registry_for([])
    get = reg.get_sample_value
    assert get("lrpilot_connections") == 3
    assert get("lrpilot_messages_received_total", {"type": "metrics"}) == 40
    assert get("lrpilot_points_received_total") == 400
    assert get("lrpilot_frames_rejected_total", {"reason": "unauthorized"}) == 2
    assert get("lrpilot_decision_latency_seconds_bucket", {"le": "0.01"}) == 5
    assert get("lrpilot_decision_latency_seconds_bucket", {"le": "+Inf"}) == 6
    assert get("lrpilot_decision_latency_seconds_count") == 6
    assert get("lrpilot_decision_latency_seconds_sum") == 0.02
    assert get("lrpilot_ingest_lag_seconds") == 0.5
    assert get("lrpilot_config_reloads_total", {"result": "ok"}) == 2
    assert get("lrpilot_config_reloads_total", {"result": "error"}) == 1
    assert get("lrpilot_jobs", {"state": "halted"}) == 1
    assert get("lrpilot_jobs", {"state": "stale"}) == 0
    assert get("lrpilot_build_info", {"version": "0.1.0"}) == 1


def test_collector_is_read_at_scrape_time() -> None:
    """The collector copies nothing: a change in the daemon's state shows in the next collection."""
    views = [job(step=1)]
    reg = CollectorRegistry()
    reg.register(LrpilotCollector(lambda: views))
    assert reg.get_sample_value("lrpilot_job_step", {"training_job": "mnist-a"}) == 1
    views[0] = job(step=2)
    views.append(job("other"))
    assert reg.get_sample_value("lrpilot_job_step", {"training_job": "mnist-a"}) == 2
    assert reg.get_sample_value("lrpilot_job_step", {"training_job": "other"}) == 1200


@pytest.mark.parametrize("name", [NASTY_NAME, "back\\slash", 'quo"te', "new\nline", "ünïcødé"])
def test_job_names_are_escaped_and_round_trip(name: str) -> None:
    """Quotes, backslashes and newlines in a job name survive the text format unchanged."""
    collector = LrpilotCollector(lambda: [job(name, detections={'de"t\\': 1})])
    parsed = samples(render_text(collector))
    assert parsed[("lrpilot_job_step", (("training_job", name),))] == 1200
    key = ("lrpilot_job_detections_total", (("detector", 'de"t\\'), ("training_job", name)))
    assert parsed[key] == 1


def test_text_renderer_matches_prometheus_client() -> None:
    """Our text writer exports exactly the samples generate_latest() gets from the collector."""
    views = [job(), job(NASTY_NAME, state="halted", lrs=(1e-7,), min_lrs=(1e-7,)), job("x", lrs=())]
    collector = LrpilotCollector(lambda: views, lambda: STATS)
    registry = CollectorRegistry()
    registry.register(collector)
    ours = samples(render_text(collector))
    theirs = samples(generate_latest(registry).decode())
    assert len(ours) > 60
    assert same_values(ours, theirs)


def test_last_seen_is_exported_to_the_millisecond() -> None:
    """A full-precision Unix time is written to the millisecond, rounded to nearest, by both
    the text writer and the collector; non-finite ones keep Prometheus' spelling."""
    views = [
        job("a", last_seen=1_764_755_915.1234567),
        job("b", last_seen=1_764_755_915.9996),
        job("c", last_seen=math.inf),
    ]
    collector = LrpilotCollector(lambda: views)
    text = render_text(collector)
    seen = "lrpilot_job_last_seen_timestamp_seconds"
    assert f'{seen}{{training_job="a"}} 1764755915.123\n' in text
    assert f'{seen}{{training_job="b"}} 1764755916.000\n' in text
    assert f'{seen}{{training_job="c"}} +Inf\n' in text
    registry = CollectorRegistry()
    registry.register(collector)
    assert same_values(samples(text), samples(generate_latest(registry).decode()))


def test_infinite_values_use_prometheus_spelling() -> None:
    """±Inf sample values are written +Inf/-Inf, the way Prometheus parses them."""
    text = render_text(
        LrpilotCollector(lambda: [job(metric_values={"a": math.inf, "b": -math.inf})])
    )
    assert 'metric="a"} +Inf\n' in text
    assert 'metric="b"} -Inf\n' in text
    assert " inf\n" not in text and " nan\n" not in text


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed")
def test_promtool_accepts_the_exposition() -> None:
    """`promtool check metrics` finds no problem in a full export with nasty names and NaNs."""
    views = [job(), job(NASTY_NAME, state="stale"), job("idle", lrs=(0.1,), metric_values={})]
    text = MetricsRenderer(LrpilotCollector(lambda: views, lambda: STATS)).render()
    result = subprocess.run(
        [shutil.which("promtool") or "promtool", "check", "metrics"],
        input=text,
        capture_output=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def test_renderer_caches_for_cache_seconds() -> None:
    """Within cache_seconds the same bytes are served; after it, the current state is rendered."""
    now = [100.0]
    views = [job(step=1)]
    renderer = MetricsRenderer(
        LrpilotCollector(lambda: views), cache_seconds=1.0, clock=lambda: now[0]
    )
    first = renderer.render()
    views[0] = job(step=2)
    now[0] += 0.5
    assert renderer.render() is first
    now[0] += 0.6
    assert b'lrpilot_job_step{training_job="mnist-a"} 2\n' in renderer.render()
    views[0] = job(step=3)
    renderer.invalidate()
    assert b'lrpilot_job_step{training_job="mnist-a"} 3\n' in renderer.render()
    assert renderer.content_type == CONTENT_TYPE


def test_renderer_rejects_a_negative_cache_time() -> None:
    """A negative cache_seconds is refused with a message naming the field."""
    with pytest.raises(ValueError, match="cache_seconds"):
        MetricsRenderer(LrpilotCollector(list), cache_seconds=-1)


def test_job_view_rejects_an_unknown_state() -> None:
    """A view with a state outside running/stale/finished/halted fails, naming job and state."""
    with pytest.raises(ValueError, match=r"'mnist-a'.*'paused'"):
        job(state="paused")


def test_expired_only_drops_ended_jobs_after_the_ttl() -> None:
    """Finished and halted jobs expire ttl seconds after last seen; running or stale ones never do."""
    finished = job(state="finished", last_seen=1000.0)
    assert not expired(finished, now=1500.0, ttl=600.0)
    assert expired(finished, now=1601.0, ttl=600.0)
    assert expired(job(state="halted", last_seen=1000.0), now=1601.0, ttl=600.0)
    assert not expired(job(state="stale", last_seen=0.0), now=1e9, ttl=600.0)
    assert not expired(job(state="running", last_seen=0.0), now=1e9, ttl=600.0)


def test_every_state_is_exported_for_every_job() -> None:
    """lrpilot_job_state has one series per known state, exactly one of them at 1."""
    views = [job(f"j{i}", state=s) for i, s in enumerate(JOB_STATES)]
    parsed = samples(render_text(LrpilotCollector(lambda: views)))
    for i, current in enumerate(JOB_STATES):
        row = {
            s: parsed[("lrpilot_job_state", (("state", s), ("training_job", f"j{i}")))]
            for s in JOB_STATES
        }
        assert row == {s: (1.0 if s == current else 0.0) for s in JOB_STATES}


def test_render_is_much_faster_than_generate_latest() -> None:
    """Rendering 1,000 jobs takes well under a third of generate_latest() on the same collector."""
    views = [
        job(f"job-{i}", metric_values={f"m{k}": i + k / 7 for k in range(5)}) for i in range(1000)
    ]
    collector = LrpilotCollector(lambda: views, lambda: STATS)
    registry = CollectorRegistry()
    registry.register(collector)

    def best_of(fn: object, n: int = 3) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()  # type: ignore[operator]
            times.append(time.perf_counter() - start)
        return min(times)

    ours = best_of(lambda: render_text(collector))
    theirs = best_of(lambda: generate_latest(registry))
    assert ours * 3 < theirs, (
        f"render_text {ours * 1e3:.1f} ms vs generate_latest {theirs * 1e3:.1f} ms"
    )


def test_memo_reuses_lines_but_never_hides_a_change() -> None:
    """A render with a warm memo equals a fresh render, also after LRs and counters change."""
    views = [job(), job("b", lrs=(math.nan,), min_lrs=(0.0,))]
    collector = LrpilotCollector(lambda: views, lambda: STATS)
    memo = RenderMemo()
    assert render_text(collector, memo) == render_text(collector)
    assert render_text(collector, memo) == render_text(collector)
    views[0] = job(lrs=(0.05, 0.01), detections={"plateau": 3, "spike": 0})
    views[1] = job("b", decisions={("set_lr", "operator"): 1}, nonfinite={"loss": 9})
    warm = render_text(collector, memo)
    assert warm == render_text(collector)
    assert 'training_job="mnist-a",param_group="0"} 0.05\n' in warm
    assert 'training_job="b",kind="set_lr",reason="operator"} 1\n' in warm
    assert set(memo.jobs) == {"mnist-a", "b"}
    views[1] = job("b", decisions={("set_lr", "operator"): 2}, nonfinite={"loss": 9})
    assert render_text(collector, memo) == render_text(collector)  # a counter moved alone
    views.pop(0)
    assert render_text(collector, memo) == render_text(collector)
    assert set(memo.jobs) == {"b"}  # only the jobs of the latest render are kept


def test_memo_sees_counters_changed_in_place() -> None:
    """A daemon view may share its counter dicts with the engine, which mutates them: the
    memo compares against copies, never against the live dict itself."""
    nonfinite = {"loss": 0}
    detections = {"spike": 0}
    memo = RenderMemo()
    views = [job(nonfinite=nonfinite, detections=detections)]
    collector = LrpilotCollector(lambda: views, lambda: STATS)
    render_text(collector, memo)
    nonfinite["loss"] = 4
    detections["spike"] = 2
    views[0] = job(nonfinite=nonfinite, detections=detections, step=9)
    warm = render_text(collector, memo)
    assert warm == render_text(collector)
    assert 'lrpilot_job_nonfinite_total{training_job="mnist-a",metric="loss"} 4\n' in warm


def test_non_finite_learning_rate_is_spelled_for_prometheus() -> None:
    """A NaN learning rate (a bug upstream) still yields a valid exposition line."""
    text = render_text(LrpilotCollector(lambda: [job(lrs=(math.nan,), min_lrs=(0.1,))]))
    assert 'lrpilot_job_learning_rate{training_job="mnist-a",param_group="0"} NaN\n' in text
    assert 'lrpilot_job_min_lr_ratio{training_job="mnist-a",param_group="0"} NaN\n' in text


def test_memo_follows_metric_names_and_optional_series() -> None:
    """A warm render equals a fresh one when a job gains a metric, loses its step or
    last-seen, gains a plateau count, or when two jobs swap which of them has a step: the
    templates of the numbers follow which series exist, so no number lands on another line."""
    memo = RenderMemo()
    views = [job("a", step=1), job("b", step=None)]
    collector = LrpilotCollector(lambda: views, lambda: STATS)
    render_text(collector, memo)
    steps = [
        [job("a", step=2, metric_values={"loss": 0.5, "val_loss": 0.25, "acc": 0.75}), views[1]],
        [job("a", step=None, last_seen=None), job("b", step=7)],  # the swap
        [job("a", step=3, plateau_bad_evaluations=None), job("b", step=8, last_seen=None)],
        [
            job("a", step=4, metric_values={}),
            job("b", step=9, plateau_bad_evaluations=0, last_seen=None),
        ],
    ]
    for new in steps:
        views[:] = new
        warm = render_text(collector, memo)
        assert warm == render_text(collector)
    assert 'lrpilot_job_step{training_job="a"} 4\n' in warm
    assert 'lrpilot_job_step{training_job="b"} 9\n' in warm
    assert 'lrpilot_job_plateau_bad_evaluations{training_job="b"} 0\n' in warm
    assert 'lrpilot_job_last_seen_timestamp_seconds{training_job="b"}' not in warm
    assert 'lrpilot_job_metric_value{training_job="a"' not in warm


@pytest.mark.parametrize("name", ["100%", "%r", "%%", "%(x)s", "%s%"])
def test_percent_signs_in_names_survive_the_templates(name: str) -> None:
    """Numbers are formatted with %: a '%' in a job or metric name is written as is, fresh
    and from a warm memo."""
    memo = RenderMemo()
    views = [job(name, metric_values={name: 0.5})]
    collector = LrpilotCollector(lambda: views)
    render_text(collector, memo)
    views[0] = job(name, metric_values={name: 0.25}, step=7)
    warm = render_text(collector, memo)
    assert warm == render_text(collector)
    parsed = samples(warm)
    assert parsed[("lrpilot_job_metric_value", (("metric", name), ("training_job", name)))] == 0.25
    assert parsed[("lrpilot_job_step", (("training_job", name),))] == 7


def test_a_render_that_fails_half_way_leaves_nothing_stale() -> None:
    """When collecting the views raises after a job's lines were updated, the next render
    (handing out that same updated view again) still shows its new numbers."""
    memo = RenderMemo()
    first = job("a", step=1)
    current: list[JobView] = [first, job("b")]
    collector = LrpilotCollector(lambda: current)
    render_text(collector, memo)
    moved = job("a", step=2, lrs=(0.5,), detections={"plateau": 9})

    def failing() -> Iterable[JobView]:
        yield moved
        raise RuntimeError("the daemon's state changed under the scrape")

    with pytest.raises(RuntimeError):
        render_text(LrpilotCollector(failing), memo)
    current[0] = moved  # the same object: its lines were updated by the failed render
    warm = render_text(collector, memo)
    assert warm == render_text(collector)
    assert 'lrpilot_job_step{training_job="a"} 2\n' in warm


def test_two_views_of_one_name_are_both_rendered() -> None:
    """Two views with the same job name (a websocket job and a watched run) each keep their
    own lines across warm renders, as in a fresh render."""
    memo = RenderMemo()
    views = [job("same", step=1), job("same", step=2)]
    collector = LrpilotCollector(lambda: views)
    for step in range(3, 6):
        warm = render_text(collector, memo)
        assert warm == render_text(collector)
        assert warm.count('lrpilot_job_step{training_job="same"}') == 2
        views[1] = job("same", step=step)


def test_an_unchanged_scrape_reuses_every_section() -> None:
    """When every view is the one of the previous render, no section is made again."""
    views = [job("a"), job("b")]
    collector = LrpilotCollector(lambda: views, lambda: STATS)
    memo = RenderMemo()
    render_text(collector, memo)
    before = memo.sections
    assert before is not None
    render_text(collector, memo)
    assert memo.sections is not None
    assert all(x is y for x, y in zip(memo.sections, before, strict=True))
    views[1] = job("b", step=5)
    render_text(collector, memo)
    after = memo.sections
    assert after is not None
    lr_at = 0
    assert after[lr_at] is before[lr_at]  # the learning rates did not change: not joined again
    assert b'lrpilot_job_step{training_job="b"} 5\n' in b"".join(after)


def test_warm_renders_equal_fresh_ones_through_random_changes() -> None:
    """Any sequence of changes (numbers, non-finite values, metric names, counters, LRs,
    states, optional series, jobs added, dropped, reordered or repeated) renders from a warm
    memo exactly as from scratch."""
    rng = random.Random(7)
    numbers = [0.0, -0.0, 1.0, 0.5, 1 / 3, 1e-7, 1.7e9 + 0.123, math.nan, math.inf, -math.inf]
    names = ["a", "b", 'q"uote', "100%", "new\nline"]
    metrics = ["loss", "val_loss", "acc", "50%"]

    def random_view(name: str, like: JobView | None = None) -> JobView:
        if like is not None and rng.random() < 0.5:  # the same metrics, other numbers
            chosen = list(like.metric_values)
        else:
            chosen = rng.sample(metrics, rng.randint(0, len(metrics)))
        maybe = lambda x: None if rng.random() < 0.2 else x  # noqa: E731
        return job(
            name,
            state=rng.choice(JOB_STATES),
            lrs=tuple(rng.choice([0.1, 0.01, 1e-4]) for _ in range(rng.randint(0, 2))),
            min_lrs=rng.choice([(), (1e-4,), (1e-5, 0.0)]),
            metric_values={m: rng.choice(numbers) for m in chosen},
            detections={"spike": rng.randint(0, 2), "plateau": rng.randint(0, 1)},
            decisions={("set_lr", "spike"): rng.randint(0, 2)} if rng.random() < 0.5 else {},
            nonfinite={m: rng.randint(0, 1) for m in chosen[:1]},
            plateau_bad_evaluations=maybe(rng.randint(0, 3)),
            last_seen=maybe(rng.choice(numbers)),
            step=maybe(rng.randint(0, 10**6)),
        )

    views = [random_view(n) for n in names[:3]]
    collector = LrpilotCollector(lambda: views, lambda: STATS)
    memo = RenderMemo()
    for _ in range(300):
        action = rng.random()
        if action < 0.6:  # some jobs changed, the others hand out the same view again
            for i in range(len(views)):
                if rng.random() < 0.5:
                    views[i] = random_view(views[i].name, like=views[i])
        elif action < 0.7 and len(views) < 6:
            views.insert(rng.randint(0, len(views)), random_view(rng.choice(names)))
        elif action < 0.8 and views:
            views.pop(rng.randrange(len(views)))
        elif action < 0.9:
            rng.shuffle(views)
        assert render_text(collector, memo) == render_text(collector)


def test_a_steady_token_has_only_the_numbers_taken() -> None:
    """A view with the same ``steady`` token as the job's last rendered one gives only its
    numbers: the renderer trusts the promise and compares nothing else (shown by a view that
    breaks it); another token (new metric names come with one) has everything compared
    again."""
    token = object()
    views = [job(steady=token)]
    collector = LrpilotCollector(lambda: views, lambda: STATS)
    memo = RenderMemo()
    render_text(collector, memo)
    views[0] = job(steady=token, metric_values={"loss": 0.5, "val_loss": 0.125}, step=1201)
    numbers_only = render_text(collector, memo)
    assert numbers_only == render_text(collector)
    assert 'metric="val_loss"} 0.125\n' in numbers_only and '"mnist-a"} 1201\n' in numbers_only
    views[0] = job(steady=token, lrs=(0.5, 0.01), step=1202)  # a broken promise
    trusted = render_text(collector, memo)
    assert 'param_group="0"} 0.1\n' in trusted and '"mnist-a"} 1202\n' in trusted
    views[0] = job(steady=object(), metric_values={"acc": 0.75}, nonfinite={}, step=1203)
    renamed = render_text(collector, memo)
    assert renamed == render_text(collector)
    assert 'lrpilot_job_nonfinite_total{training_job="mnist-a",metric="acc"} 0\n' in renamed
    views[0] = job(steady=object(), lrs=(0.5, 0.01), step=1204)
    assert render_text(collector, memo) == render_text(collector)


def test_warm_renders_with_steady_tokens_equal_fresh_ones() -> None:
    """Jobs that keep their token while only their numbers move (metric values, plateau
    count, last seen, step; names and optional series kept), mixed with jobs whose other
    parts (metric names and optional series too) change under a new token, render from a
    warm memo exactly as from scratch."""
    rng = random.Random(11)
    numbers = [0.0, -0.0, 1.0, 1 / 3, 1.7e9 + 0.123, math.nan, math.inf, -math.inf]
    maybe = lambda x: None if rng.random() < 0.2 else x  # noqa: E731
    like_before = lambda old, new: None if old is None else new  # noqa: E731

    def numbers_of(like: JobView) -> JobView:
        return dataclasses.replace(
            like,
            metric_values={m: rng.choice(numbers) for m in like.metric_values},
            plateau_bad_evaluations=like_before(like.plateau_bad_evaluations, rng.randint(0, 3)),
            last_seen=like_before(like.last_seen, rng.choice(numbers)),
            step=like_before(like.step, rng.randint(0, 10**6)),
        )

    def rest_of(like: JobView) -> JobView:
        names = list(like.metric_values)
        if rng.random() < 0.3:
            names.append(rng.choice(["acc", "grad_norm"]))
        return dataclasses.replace(
            like,
            metric_values={m: rng.choice(numbers) for m in names},
            plateau_bad_evaluations=maybe(rng.randint(0, 3)),
            last_seen=maybe(rng.choice(numbers)),
            step=maybe(rng.randint(0, 10**6)),
            state=rng.choice(JOB_STATES),
            lrs=(rng.choice([0.1, 0.01]),),
            detections={"spike": rng.randint(0, 2)},
            decisions={("set_lr", "spike"): rng.randint(0, 2)},
            nonfinite={"loss": rng.randint(0, 2)},
            steady=object(),
        )

    views = [job(f"j{i}", steady=object()) for i in range(4)]
    collector = LrpilotCollector(lambda: views, lambda: STATS)
    memo = RenderMemo()
    for _ in range(300):
        for i, view in enumerate(views):
            action = rng.random()
            if action < 0.5:
                views[i] = numbers_of(view)
            elif action < 0.7:
                views[i] = rest_of(view)
            elif action < 0.75:
                views[i] = dataclasses.replace(rest_of(view), steady=None)
        if rng.random() < 0.05:
            rng.shuffle(views)
        assert render_text(collector, memo) == render_text(collector)


def test_renewed_views_render_their_new_numbers() -> None:
    """A view handed out again as the same object, its numbers replaced in place under a new
    ``stamp`` (JobView), is rendered with the new numbers, mixed with unchanged views, views
    renewed, new views and reordered jobs; the same object with the same stamp is taken as
    unchanged (shown by numbers replaced without a new stamp, a broken promise)."""
    rng = random.Random(5)
    numbers = [0.0, -0.0, 1.0, 1 / 3, 1.7e9 + 0.123, math.nan, math.inf, -math.inf]

    def renew(view: JobView) -> None:
        for metric in view.metric_values:  # the view's own dict, values replaced in place
            view.metric_values[metric] = rng.choice(numbers)  # type: ignore[index]
        if view.plateau_bad_evaluations is not None:
            view.plateau_bad_evaluations = rng.randint(0, 3)
        if view.last_seen is not None:
            view.last_seen = rng.choice(numbers)
        if view.step is not None:
            view.step = rng.randint(0, 10**6)
        view.stamp = object()

    views = [job(f"j{i}", steady=object(), stamp=object()) for i in range(4)]
    views[1] = dataclasses.replace(views[1], plateau_bad_evaluations=None, last_seen=None)
    collector = LrpilotCollector(lambda: views, lambda: STATS)
    memo = RenderMemo()
    render_text(collector, memo)
    for _ in range(300):
        for i, view in enumerate(views):
            action = rng.random()
            if action < 0.5:
                renew(view)
            elif action < 0.55:
                views[i] = dataclasses.replace(
                    view, metric_values=dict(view.metric_values), lrs=(rng.random(),),
                    steady=object(), stamp=object(),
                )  # fmt: skip
        if rng.random() < 0.05:
            rng.shuffle(views)
        assert render_text(collector, memo) == render_text(collector)

    render_text(collector, memo)
    views[0].step = 123456789  # no new stamp: the renderer may serve its last text
    assert "} 123456789\n" not in render_text(collector, memo)
    views[0].stamp = object()
    assert "} 123456789\n" in render_text(collector, memo)


def test_views_handed_out_again_after_other_views_render_as_fresh() -> None:
    """Two lists of views with the same tokens handed out in turn (a view object comes back
    after another one of its job was rendered), a token changing in one of them, non-finite
    numbers and an int too large for a float: every warm render equals a fresh one."""
    tokens = [object() for _ in range(3)]

    def views_at(tick: int) -> list[JobView]:
        return [
            job(
                f"j{i}",
                steady=tokens[i],
                metric_values={"loss": 0.5 + tick, "val_loss": math.nan if tick else 0.25},
                step=10**400 if i == 2 else tick,
            )
            for i in range(3)
        ]

    turns = [views_at(0), views_at(1)]
    collector = LrpilotCollector(lambda: turns[0], lambda: STATS)
    memo = RenderMemo()
    for n in range(7):  # the last render is of the second list
        if n == 3:
            turns[1][1] = job("j1", lrs=(0.5, 0.01), steady=object())  # a new token
        turns.reverse()
        warm = render_text(collector, memo)
        assert warm == render_text(collector)
    assert 'metric="val_loss"} NaN\n' in warm
    assert f'lrpilot_job_step{{training_job="j2"}} {10**400}\n' in warm


def reference_job_samples(views: list[JobView]) -> list[str]:
    """The sample lines of the job families, written the plain way: family by family, job by
    job, every number spelled as Prometheus does (repr, NaN, +Inf, -Inf), last-seen times to
    the millisecond."""

    def num(x: float, spell: Callable[[float], str] = repr) -> str:
        if isinstance(x, float) and not math.isfinite(x):
            return "NaN" if math.isnan(x) else ("+Inf" if x > 0 else "-Inf")
        return spell(x)

    def esc(value: str) -> str:
        return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')

    def line(family: str, labels: dict[str, str], x: float) -> str:
        text = ",".join(f'{k}="{esc(v)}"' for k, v in labels.items())
        spell = "{:.3f}".format if family == "last_seen_timestamp_seconds" else repr
        return f"lrpilot_job_{family}{{{text}}} {num(x, spell)}"

    out: list[str] = []
    tj = "training_job"
    for v in views:
        out += [
            line("learning_rate", {tj: v.name, "param_group": str(g)}, x)
            for g, x in enumerate(v.lrs)
        ]
    for v in views:
        floors = list(v.min_lrs) + [0.0] * len(v.lrs)
        out += [
            line(
                "min_lr_ratio",
                {tj: v.name, "param_group": str(g)},
                x / floors[g] if floors[g] > 0 else math.inf,
            )
            for g, x in enumerate(v.lrs)
        ]
    for v in views:
        out += [
            line("metric_value", {tj: v.name, "metric": m}, x) for m, x in v.metric_values.items()
        ]
    for v in views:
        counts = dict.fromkeys(v.metric_values, 0) | dict(v.nonfinite)
        out += [line("nonfinite_total", {tj: v.name, "metric": m}, n) for m, n in counts.items()]
    for v in views:
        out += [
            line("detections_total", {tj: v.name, "detector": d}, n)
            for d, n in v.detections.items()
        ]
    for v in views:
        out += [
            line("decisions_total", {tj: v.name, "kind": kind, "reason": reason}, n)
            for (kind, reason), n in v.decisions.items()
        ]
    for family, attr in (
        ("plateau_bad_evaluations", "plateau_bad_evaluations"),
        ("last_seen_timestamp_seconds", "last_seen"),
        ("step", "step"),
    ):
        out += [
            line(family, {tj: v.name}, getattr(v, attr))
            for v in views
            if getattr(v, attr) is not None
        ]
    for v in views:
        out += [line("state", {tj: v.name, "state": s}, int(s == v.state)) for s in JOB_STATES]
    return out


def job_samples(text: str) -> list[str]:
    return [s for s in text.splitlines() if s.startswith("lrpilot_job_")]


def test_warm_renders_equal_a_plain_reference_byte_for_byte() -> None:
    """Through a job gaining a metric and a decision reason, NaN and infinite numbers, a
    negative zero, ints, every job keeping its token while its numbers move, and an
    unchanged scrape, each warm render's job lines are exactly those of a plain reference
    writer."""
    tokens = {name: object() for name in ("a", 'b"%', "c\n")}
    views = [job(name, steady=tokens[name]) for name in tokens]
    collector = LrpilotCollector(lambda: views, lambda: STATS)
    memo = RenderMemo()

    def check() -> None:
        text = render_text(collector, memo)
        assert job_samples(text) == reference_job_samples(views)

    check()
    check()  # nothing changed
    for tick, x in enumerate([0.1, math.nan, math.inf, -math.inf, -0.0, 1 / 3, 1.7e9 + 0.5]):
        views = [
            dataclasses.replace(
                v, metric_values={m: x for m in v.metric_values}, last_seen=x, step=tick
            )
            for v in views
        ]
        check()  # every job kept its token: only the numbers are taken
    views[1] = dataclasses.replace(
        views[1], metric_values={**views[1].metric_values, "grad_norm": 2.5}, steady=object()
    )
    check()  # a new metric
    views[2] = dataclasses.replace(
        views[2],
        decisions={**views[2].decisions, ("set_lr", "spike"): 1},
        steady=object(),
    )
    check()  # a new decision reason
    views[0] = dataclasses.replace(views[0], last_seen=None, step=None, steady=object())
    check()  # optional series gone for one job
    views = [dataclasses.replace(v, plateau_bad_evaluations=7) for v in views]
    check()  # the same tokens, other numbers again
    assert 'lrpilot_job_metric_value{training_job="b\\"%",metric="grad_norm"} 2.5' in (
        job_samples(render_text(collector, memo))
    )


def test_a_job_keeping_its_token_has_not_even_its_name_read() -> None:
    """When every job carries the token its position carried last time, the renderer trusts
    that they are the same jobs (a token is of one job) and takes only the numbers: shown by
    a view that breaks the promise with another name."""
    token = object()
    views = [job("first", steady=token)]
    collector = LrpilotCollector(lambda: views, lambda: STATS)
    memo = RenderMemo()
    render_text(collector, memo)
    views = [job("second", steady=token, step=77)]
    trusted = render_text(collector, memo)
    assert 'lrpilot_job_step{training_job="first"} 77\n' in trusted
    views = [job("second", steady=object(), step=78)]
    assert render_text(collector, memo) == render_text(collector)


def test_metric_values_of_any_mapping_are_rendered() -> None:
    """A view whose metric values are a read-only mapping, not a dict, renders like one
    with a dict, warm or fresh."""
    from types import MappingProxyType

    plain = [job("a"), job("b", metric_values={"loss": 0.5})]
    proxied = [
        dataclasses.replace(v, metric_values=MappingProxyType(dict(v.metric_values))) for v in plain
    ]
    memo = RenderMemo()
    expected = render_text(LrpilotCollector(lambda: plain, lambda: STATS))
    assert render_text(LrpilotCollector(lambda: proxied, lambda: STATS), memo) == expected
    assert render_text(LrpilotCollector(lambda: proxied, lambda: STATS), memo) == expected


def test_render_with_head_puts_the_head_of_the_body_length_in_front_and_caches() -> None:
    """render_with_head(head) is head(len(body)) + the body render() gives, and is cached for
    the same head like render() is."""
    now = [100.0]
    views = [job(step=1)]
    renderer = MetricsRenderer(
        LrpilotCollector(lambda: views), cache_seconds=1.0, clock=lambda: now[0]
    )
    lengths: list[int] = []

    def head(length: int) -> bytes:
        lengths.append(length)
        return f"HEAD {length}\n".encode()

    body = renderer.render()
    now[0] += 5  # past the cache: a fresh render for the head
    whole = renderer.render_with_head(head)
    assert whole == f"HEAD {len(body)}\n".encode() + body
    assert lengths == [len(body)]
    views[0] = job(step=2)
    now[0] += 0.5
    assert renderer.render_with_head(head) is whole  # cached
    assert b'lrpilot_job_step{training_job="mnist-a"} 2\n' in renderer.render()  # another head


def test_metrics_over_http_is_one_well_formed_response(tmp_path: Path) -> None:
    """The daemon's /metrics response, read off the socket: status line, headers (type,
    a Content-Length equal to the body's, close, server) and the exposition as the body."""
    def raw_get(port: int) -> bytes:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            chunks = []
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)

    async def main() -> bytes:
        async with running(make_config(tmp_path, exporter={"cache_seconds": 0})) as d:
            c = await Client.open(d.url)
            await c.hello("wire-job")
            await c.metrics([1], loss=[0.5])
            raw = await asyncio.to_thread(raw_get, d.port)
            await c.close()
            return raw

    raw = asyncio.run(main())
    head, _, body = raw.partition(b"\r\n\r\n")
    status, *lines = head.decode("ascii").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines)
    assert status == "HTTP/1.1 200 OK"
    assert headers["Content-Type"] == CONTENT_TYPE
    assert int(headers["Content-Length"]) == len(body) > 0
    assert headers["Connection"] == "close"
    assert headers["Server"].startswith("lrpilot/")
    text = body.decode()
    assert 'lrpilot_job_metric_value{training_job="wire-job",metric="loss"} 0.5\n' in text
    assert text.endswith(" 1.0\n") and "lrpilot_build_info" in text
    families = {f.name for f in text_string_to_metric_families(text)}
    assert "lrpilot_job_learning_rate" in families

"""A scrape reuses the lines of jobs that did not change, and never those of one that did."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from lrpilot._protocol import Hello, MetricsBatch

from monitor.config import Config
from monitor.exporter import JobView, LrpilotCollector, RenderMemo, render_text
from monitor.server.daemon_stats import DaemonStats
from monitor.server.jobs import JobRegistry
from monitor.server.store import Store

from ._daemon import FakeClock, FakePeer, make_config


def _registry(tmp_path: Path) -> tuple[JobRegistry, Store, FakeClock]:
    config = make_config(tmp_path, server={"stale_after_seconds": 10})
    store = Store(tmp_path / "state")
    clock = FakeClock()
    return JobRegistry(config, store, DaemonStats(), clock), store, clock


def _fresh_views(registry: JobRegistry) -> list[JobView]:
    """The views views() builds for jobs it has not seen, from every job's engine; the
    registry's own bookkeeping (last views, numbers left by ingest) is left as it was."""
    kept = [
        (job, job.view, job.view_shape, job.view_ended, job.export_bad, job.export_step)
        for job in registry.jobs.values()
    ]
    lrs = [job.export_lrs for job in registry.jobs.values()]
    ended = registry.ended_views
    for job in registry.jobs.values():
        job.view = None
    try:
        return registry.views()
    finally:
        for (job, view, shape, view_ended, bad, step), job_lrs in zip(kept, lrs, strict=True):
            job.view, job.view_shape, job.view_ended = view, shape, view_ended
            job.export_bad, job.export_step, job.export_lrs = bad, step, job_lrs
        registry.ended_views = ended


def _text(views: list[JobView]) -> str:
    return render_text(LrpilotCollector(lambda: views))


def test_registry_hands_out_the_same_view_until_the_job_changes(tmp_path: Path) -> None:
    """views() repeats a job's view object while nothing happens, and builds a new one after a
    metrics message, an operator action and a state change."""
    registry, store, clock = _registry(tmp_path)
    job = registry.attach(Hello(job="a", lrs=(0.1,)), FakePeer()).job
    registry.attach(Hello(job="b", lrs=(0.1,)), FakePeer())
    first = registry.views()
    assert [v.name for v in first] == ["a", "b"]
    again = registry.views()
    assert again[0] is first[0] and again[1] is first[1]

    registry.ingest(job, 0, MetricsBatch(steps=[1], values={"loss": [0.5]}))
    fed = registry.views()
    assert fed[0] is not first[0] and fed[1] is first[1]
    assert fed[0].metric_values == {"loss": 0.5} and fed[0].step == 1

    registry.manual(job, "set_lr", (0.05,), "test", "tester")
    manual = registry.views()
    assert manual[0] is not fed[0] and manual[0].lrs == (0.05,)
    assert manual[0].decisions == {("set_lr", "operator"): 1}  # not the counts of the old view

    clock.now += 60
    assert registry.tick() == ["a", "b"]
    stale = registry.views()
    assert [v.state for v in stale] == ["stale", "stale"]
    assert stale[1] is not first[1]
    store.close()


def test_a_new_run_under_the_same_name_gets_its_own_view(tmp_path: Path) -> None:
    """A new run replaces the job object; its view is built from the new engine even when the
    new job's version number equals the old one's, and the render follows."""
    registry, store, _clock = _registry(tmp_path)
    old = registry.attach(Hello(job="a", run_id="r1", lrs=(0.1,)), FakePeer()).job
    collector = LrpilotCollector(registry.views)
    memo = RenderMemo()
    [first] = registry.views()
    render_text(collector, memo)
    new = registry.attach(Hello(job="a", run_id="r2", lrs=(0.3,)), FakePeer()).job
    assert new is not old and new.version == old.version  # a cache keyed on versions alone fails
    [second] = registry.views()
    assert second is not first and second.lrs == (0.3,)
    warm = render_text(collector, memo)
    assert warm == render_text(collector)
    assert 'lrpilot_job_learning_rate{training_job="a",param_group="0"} 0.3\n' in warm
    store.close()


def test_renderer_reuses_a_repeated_view_and_rerenders_a_new_one(tmp_path: Path) -> None:
    """With a warm memo, the text equals a fresh render both for repeated and for new views."""
    registry, store, _clock = _registry(tmp_path)
    job = registry.attach(Hello(job="a", lrs=(0.1,)), FakePeer()).job
    registry.attach(Hello(job="b", lrs=(0.2,)), FakePeer())
    registry.ingest(job, 0, MetricsBatch(steps=[1], values={"loss": [float("nan")]}))
    collector = LrpilotCollector(registry.views)
    memo = RenderMemo()
    assert render_text(collector, memo) == render_text(collector)
    assert render_text(collector, memo) == render_text(collector)
    assert set(memo.jobs) == {"a", "b"}

    registry.ingest(job, 0, MetricsBatch(steps=[2], values={"loss": [0.25]}))
    warm = render_text(collector, memo)
    assert warm == render_text(collector)
    assert 'lrpilot_job_metric_value{training_job="a",metric="loss"} 0.25\n' in warm
    assert 'training_job="a"} 2\n' in warm  # the step line moved on
    store.close()


def test_an_equal_but_new_view_object_is_rendered_again() -> None:
    """Reuse goes by identity: a new view object with other values is never served old lines."""
    memo = RenderMemo()
    old = JobView(name="j", state="running", lrs=(0.1,), step=1)
    assert "} 0.1\n" in render_text(LrpilotCollector(lambda: [old]), memo)
    new = JobView(name="j", state="running", lrs=(0.2,), step=2)
    text = render_text(LrpilotCollector(lambda: [new]), memo)
    assert "} 0.2\n" in text and "} 0.1\n" not in text
    assert memo.jobs["j"].view is new


def test_dirty_jobs_are_snapshotted_a_slice_at_a_time(tmp_path: Path) -> None:
    """snapshot_dirty(limit) queues at most ``limit`` changed jobs per call, each once, and
    the state file then holds every job's latest state."""
    registry, store, _clock = _registry(tmp_path)
    jobs = [registry.attach(Hello(job=f"j{i}", lrs=(0.1,)), FakePeer()).job for i in range(10)]
    for i, job in enumerate(jobs):
        registry.ingest(job, 0, MetricsBatch(steps=[i + 1], values={"loss": [0.5]}))
    assert [registry.snapshot_dirty(4) for _ in range(4)] == [4, 4, 2, 0]
    assert not any(job.dirty for job in jobs)
    store.flush()
    saved = {j.job: j.state for j in store.load_jobs()}
    assert {name: state["rank_steps"] for name, state in saved.items() if state} == {
        f"j{i}": {"0": i + 1} for i in range(10)
    }
    store.close()


def test_counts_by_state_reports_connected_jobs_as_running(tmp_path: Path) -> None:
    registry, store, _clock = _registry(tmp_path)
    jobs = [registry.attach(Hello(job=f"j{i}", lrs=(0.1,)), FakePeer()).job for i in range(4)]
    registry.ingest(jobs[0], 0, MetricsBatch(steps=[1], values={"loss": [0.5]}))
    registry.finished(jobs[1], 0, 5)
    assert registry.counts_by_state() == {"running": 3, "finished": 1}
    store.close()


def test_scrape_drops_only_ended_jobs_past_the_ttl(tmp_path: Path) -> None:
    """The daemon's jobs() filters views only when some job ended (views() counts them), and
    then drops exactly the finished or halted jobs last seen more than the TTL ago."""
    from monitor.server.app import Daemon

    config = make_config(tmp_path, exporter={"finished_job_ttl_seconds": 60, "cache_seconds": 0})
    store = Store(tmp_path / "state")
    clock = FakeClock()
    wall = [1.7e9]
    registry = JobRegistry(config, store, DaemonStats(), clock, wall_clock=lambda: wall[0])
    daemon = Daemon(config)
    daemon.registry = registry
    renderer = daemon._make_renderer()
    a = registry.attach(Hello(job="a", lrs=(0.1,)), FakePeer()).job
    b = registry.attach(Hello(job="b", lrs=(0.1,)), FakePeer()).job
    registry.ingest(a, 0, MetricsBatch(steps=[1], values={"loss": [0.5]}))
    registry.views()
    assert registry.ended_views == 0
    registry.finished(b, 0, 3)
    registry.views()
    assert registry.ended_views == 1
    registry.views()  # counted again from the reused views
    assert registry.ended_views == 1
    # b was last seen at 1.7e9 (wall clock of the registry); the scrape's clock is real time,
    # decades later: b is past the TTL, a is running and stays
    text = renderer.render().decode()
    assert 'lrpilot_job_step{training_job="a"} 1\n' in text
    assert 'training_job="b"' not in text
    wall[0] = time.time()
    registry.tick()  # takes the wall clock's offset again
    registry.heartbeat(b, 0, None)  # seen now: within the TTL again
    text = renderer.render().decode()
    assert 'lrpilot_job_state{training_job="b",state="finished"} 1\n' in text
    store.close()


@pytest.mark.parametrize("detectors", ["default", "none"])
def test_warm_scrapes_of_a_busy_registry_equal_fresh_renders(
    tmp_path: Path, detectors: str
) -> None:
    """Through random traffic (metrics with NaN and new names, val_loss plateaus that cut the
    LR, a schedule's LRs, heartbeats, checkpoints, a second rank's steps, operator set_lr and
    pause, finished jobs, silence, a new run), every render from the warm memo, which takes
    only the numbers of views whose ``steady`` token did not change, equals a render of the
    same views from scratch and one of views built afresh from the engines; and the token is
    reused at all."""
    import math
    import random

    # detectors fire without a decision (cooling down); a cyclic schedule moves the LRs
    # without one
    off = dict.fromkeys(Config.model_validate({}).defaults.detectors, False)
    config = make_config(tmp_path, defaults={"detectors": off} if detectors == "none" else {})
    store = Store(tmp_path / "state")
    clock = FakeClock()
    registry = JobRegistry(config, store, DaemonStats(), clock)
    rng = random.Random(3)
    cyclic = {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 3}

    def hello(i: int, run_id: str = "") -> Hello:
        policy = cyclic if i % 2 else None
        world = 2 if i >= 2 else 1
        total = 40 if i == 2 else None  # an anneal over its last steps, when configured
        return Hello(
            job=f"j{i}",
            run_id=run_id,
            lrs=(0.1, 0.01),
            policy=policy,
            world_size=world,
            total_steps=total,
        )

    jobs = [registry.attach(hello(i), FakePeer()).job for i in range(4)]
    views: list[JobView] = []
    collector = LrpilotCollector(lambda: views)
    memo = RenderMemo()
    steps = dict.fromkeys(range(4), 0)
    reused = 0
    for _ in range(200):
        for i in range(4):
            job = jobs[i]
            action = rng.random()
            if action < 0.6:
                steps[i] += 1
                values = {"loss": [rng.choice([0.5, 0.25, math.nan])]}
                if rng.random() < 0.3:
                    values["val_loss"] = [rng.choice([1.0, 0.9, 1.1])]
                if rng.random() < 0.05:
                    values[f"m{rng.randint(0, 3)}"] = [1.0]
                registry.ingest(job, 0, MetricsBatch(steps=[steps[i]], values=values))
            elif action < 0.62:
                registry.heartbeat(job, 0, None)
            elif action < 0.63:
                registry.checkpoint(job, 0, steps[i])
            elif action < 0.64 and i >= 2:
                rank_values: dict[str, list[float | None]] = {"loss": [0.5], "r1": [rng.random()]}
                registry.ingest(job, 1, MetricsBatch(steps=[steps[i] + 1], values=rank_values))
            elif action < 0.65:
                registry.manual(job, "set_lr", (rng.choice([0.2, 0.05]),) * 2, "t", "tester")
            elif action < 0.68:
                registry.manual(job, rng.choice(["pause", "resume"]), None, "t", "tester")
            elif action < 0.7:
                registry.finished(job, 0, steps[i])
            elif action < 0.71:
                jobs[i] = registry.attach(hello(i, f"r{rng.random()}"), FakePeer()).job
                steps[i] = 0
        if rng.random() < 0.05:
            clock.now += 60
            registry.tick()
        before = {v.name: v.steady for v in views}
        views = registry.views()
        reused += sum(1 for v in views if v.steady is not None and v.steady is before.get(v.name))
        warm = render_text(collector, memo)
        assert warm == render_text(collector)
        # and what the warm views show is what the engines hold (views built afresh)
        assert warm == _text(_fresh_views(registry))
    assert reused > 100
    store.close()


def _scraped(registry: JobRegistry, memo: RenderMemo) -> str:
    """A scrape as the daemon's: views() rendered with a warm memo; checked against the
    views built from the engines, rendered from scratch."""
    text = render_text(LrpilotCollector(registry.views), memo)
    assert text == _text(_fresh_views(registry))
    return text


def test_a_job_that_only_reported_numbers_gets_its_view_renewed(tmp_path: Path) -> None:
    """After metrics that change nothing but numbers, views() hands out the same view object
    with the new step, plateau count, last-seen time and a new stamp, and the scrape shows
    the new numbers; a heartbeat renews the last-seen time alone."""
    registry, store, clock = _registry(tmp_path)
    job = registry.attach(Hello(job="a", lrs=(0.1,)), FakePeer()).job
    memo = RenderMemo()
    registry.ingest(job, 0, MetricsBatch(steps=[1], values={"loss": [0.5]}))
    _scraped(registry, memo)
    [first] = registry.views()
    stamp = first.stamp
    clock.now += 2
    registry.ingest(job, 0, MetricsBatch(steps=[2], values={"loss": [0.25]}))
    text = _scraped(registry, memo)
    [renewed] = registry.views()
    assert renewed is first and renewed.step == 2 and renewed.stamp is not stamp
    assert renewed.last_seen == job.last_seen_wall
    assert 'lrpilot_job_metric_value{training_job="a",metric="loss"} 0.25\n' in text
    assert 'lrpilot_job_step{training_job="a"} 2\n' in text
    clock.now += 3
    registry.heartbeat(job, 0, None)
    text = _scraped(registry, memo)
    assert (
        f'lrpilot_job_last_seen_timestamp_seconds{{training_job="a"}} {job.last_seen_wall:.3f}'
        in text
    )
    store.close()


def test_a_scrape_shows_a_counter_that_moved_without_a_decision(tmp_path: Path) -> None:
    """A detection whose response is none changes only counters: the next scrape shows the
    detection and the NaN count."""
    registry, store, _clock = _registry(tmp_path)
    registry.set_config(
        make_config(tmp_path, defaults={"detectors": {"non_finite": {"response": "none"}}})
    )
    job = registry.attach(Hello(job="a", lrs=(0.1,)), FakePeer()).job
    memo = RenderMemo()
    registry.ingest(job, 0, MetricsBatch(steps=[1], values={"loss": [0.5]}))
    _scraped(registry, memo)
    fan = registry.ingest(job, 0, MetricsBatch(steps=[2], values={"loss": [float("nan")]}))
    assert fan is None and job.engine.decisions_made == 0
    text = _scraped(registry, memo)
    assert 'lrpilot_job_detections_total{training_job="a",detector="non_finite"} 1\n' in text
    assert 'lrpilot_job_nonfinite_total{training_job="a",metric="loss"} 1\n' in text
    store.close()


def test_a_scrape_shows_a_new_state_a_new_metric_name_and_an_lr_moved_by_a_schedule(
    tmp_path: Path,
) -> None:
    """Each of: the state alone (silence), a new metric name alone, the LR alone (a cyclic
    schedule, no decision) is in the next scrape."""
    registry, store, clock = _registry(tmp_path)
    cyclic = {"kind": "cyclic", "base_lr": 0.01, "max_lr": 0.1, "step_size_up": 4}
    job = registry.attach(Hello(job="a", lrs=(0.1,), policy=cyclic), FakePeer()).job
    memo = RenderMemo()
    registry.ingest(job, 0, MetricsBatch(steps=[1], values={"loss": [0.5]}))
    text = _scraped(registry, memo)
    lr_line = 'lrpilot_job_learning_rate{training_job="a",param_group="0"} '
    lr_before = text.split(lr_line)[1].split("\n")[0]
    decisions = job.engine.decisions_made
    registry.ingest(job, 0, MetricsBatch(steps=[2], values={"loss": [0.5]}))
    text = _scraped(registry, memo)
    assert job.engine.decisions_made == decisions
    assert text.split(lr_line)[1].split("\n")[0] == repr(job.engine.lrs[0]) != lr_before

    registry.ingest(job, 0, MetricsBatch(steps=[3], values={"loss": [0.5], "acc": [0.75]}))
    text = _scraped(registry, memo)
    assert 'lrpilot_job_metric_value{training_job="a",metric="acc"} 0.75\n' in text
    assert 'lrpilot_job_nonfinite_total{training_job="a",metric="acc"} 0\n' in text

    clock.now += 60
    assert registry.tick() == ["a"]
    text = _scraped(registry, memo)
    assert 'lrpilot_job_state{training_job="a",state="stale"} 1\n' in text
    store.close()


def test_a_job_restored_without_a_last_seen_time_gains_its_series(tmp_path: Path) -> None:
    """A job loaded from the store with no last-seen time has no last-seen line until its
    first message; then the scrape has one."""
    registry, store, _clock = _registry(tmp_path)
    job = registry.attach(Hello(job="a", lrs=(0.1,)), FakePeer()).job
    registry.ingest(job, 0, MetricsBatch(steps=[1], values={"loss": [0.5]}))
    job.last_seen_wall = None  # as load() leaves a job whose snapshot had none
    job.shape += 1
    memo = RenderMemo()
    assert "lrpilot_job_last_seen_timestamp_seconds{" not in _scraped(registry, memo)
    registry.heartbeat(job, 0, None)
    assert "lrpilot_job_last_seen_timestamp_seconds{" in _scraped(registry, memo)
    store.close()

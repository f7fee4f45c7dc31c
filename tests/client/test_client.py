"""The client without a network: buffering, batching, overflow, backoff, reconnect and resume,
decision application at exactly apply_at_step, acks, fail-open."""

from __future__ import annotations

import math
import random
import socket
import statistics
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

import pytest
from lrpilot import Backoff, Client, Decision, DecisionKind
from lrpilot import _protocol as proto

from tests.client.fakes import FakeClock, FakeDaemon

URL = "ws://127.0.0.1:1/ws"
_made: list[Client] = []


@pytest.fixture(autouse=True)
def _close_clients() -> object:
    yield
    while _made:
        _made.pop().close(timeout=0.5)


def make_client(daemon: FakeDaemon, clock: FakeClock | None = None, **kwargs: object) -> Client:
    clock = clock or FakeClock()
    defaults: dict[str, object] = {
        "transport": daemon,
        "clock": clock,
        "sleep": clock.sleep,
        "start": False,
        "flush_interval": 0.0,
        "backoff": Backoff(rng=lambda: 0.0),
    }
    defaults.update(kwargs)
    client = Client(URL, "job-a", defaults.pop("initial_lr", 0.1), **defaults)  # type: ignore[arg-type]
    _made.append(client)
    return client


def pump(client: Client, times: int = 1) -> None:
    for _ in range(times):
        client._sender.run_once()


# --------------------------------------------------------------------------- buffering


def test_report_only_buffers_until_the_sender_runs() -> None:
    """report() appends to the buffer; nothing is sent before the sender wakes."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    client.report(0, loss=1.0)
    assert len(client._buffer) == 1
    assert daemon.of_type(proto.MetricsBatch) == []
    pump(client, 2)  # connect, then flush
    assert daemon.metric_rows() == [(0, {"loss": 1.0})]


def test_many_reports_become_one_columnar_frame() -> None:
    """Points reported between two wakes travel as one frame, with nulls where a metric is absent."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)  # connect
    for step in range(10):
        client.report(step, loss=1.0 / (step + 1))
    client.report(9, val_loss=0.7)  # same step, new name: merged into the row of step 9
    pump(client)
    batches = daemon.of_type(proto.MetricsBatch)
    assert len(batches) == 1
    batch = batches[0]
    assert batch.steps == list(range(10))
    assert batch.values["loss"] == pytest.approx([1.0 / (s + 1) for s in range(10)])
    assert batch.values["val_loss"] == [None] * 9 + [0.7]
    assert batch.epochs is None
    # the time of the frame's last row only: the daemon samples its step rate and ingest
    # lag from those
    assert batch.times is not None and len(batch.times) == 10
    assert batch.times[:-1] == [None] * 9 and batch.times[-1] == pytest.approx(time.time(), abs=5)


def test_same_step_and_same_name_makes_a_new_row() -> None:
    """Reporting the same metric twice for one step keeps both values as two rows."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    client.report(3, loss=1.0)
    client.report(3, loss=2.0)
    pump(client)
    assert daemon.metric_rows() == [(3, {"loss": 1.0}), (3, {"loss": 2.0})]


def test_epochs_column_and_nonfinite_values() -> None:
    """Epochs are sent when given, and NaN/Inf values arrive as NaN/Inf."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    client.report(0, epoch=0, loss=math.nan)
    client.report(1, epoch=1, loss=math.inf)
    pump(client)
    (batch,) = daemon.of_type(proto.MetricsBatch)
    assert batch.epochs == [0, 1]
    loss0, loss1 = batch.values["loss"]
    assert loss0 is not None and math.isnan(loss0)
    assert loss1 == math.inf


def test_bad_values_become_null_and_are_counted() -> None:
    """A value that is not a number is sent as null and counted; report() does not raise."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    client.report(0, loss="oops", acc=0.5)
    client.report("not a step", loss=1.0)  # type: ignore[arg-type]
    pump(client)
    assert daemon.metric_rows() == [(0, {"acc": 0.5})]
    assert client.stats.bad_values == 1
    assert client.stats.report_errors == 1


def test_tensor_like_values_are_converted_on_the_sender() -> None:
    """Objects with __float__ (0-d tensors) are accepted and converted when sent."""

    class Scalar:
        def __float__(self) -> float:
            return 0.25

    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    client.report(0, loss=Scalar())
    pump(client)
    assert daemon.metric_rows() == [(0, {"loss": 0.25})]


def test_a_gpu_tensor_with_a_graph_is_kept_detached() -> None:
    """A GPU tensor reported with its autograd graph (``loss`` itself) is buffered detached,
    so the graph is not kept until the sender converts it; a CPU tensor becomes a float."""
    import torch

    class GpuScalar:  # what report() looks at of a CUDA tensor, without a GPU
        is_cuda = True

        def __init__(self, requires_grad: bool) -> None:
            self.requires_grad = requires_grad

        def detach(self) -> GpuScalar:
            return GpuScalar(False)

        def __float__(self) -> float:
            return 0.5

    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    weight = torch.tensor(2.0, requires_grad=True)
    loss = weight * 3.0
    gpu = GpuScalar(True)
    client.report(0, loss=gpu, cpu_loss=loss)
    ((_, _, _, metrics),) = client._buffer
    assert isinstance(metrics["loss"], GpuScalar) and metrics["loss"] is not gpu
    assert not metrics["loss"].requires_grad
    assert metrics["cpu_loss"].__class__ is float and metrics["cpu_loss"] == 6.0
    pump(client)
    assert daemon.metric_rows() == [(0, {"loss": 0.5, "cpu_loss": 6.0})]


def test_large_backlog_is_split_into_bounded_frames() -> None:
    """A backlog larger than max_points_per_frame goes out as several frames, in order."""
    daemon = FakeDaemon()
    client = make_client(daemon, max_points_per_frame=100)
    pump(client)
    for step in range(250):
        client.report(step, loss=float(step))
    pump(client)
    sizes = [len(b.steps) for b in daemon.of_type(proto.MetricsBatch)]
    assert sizes == [100, 100, 50]
    assert [s for s, _ in daemon.metric_rows()] == list(range(250))
    assert client.stats.sent_points == 250


def reporting_while_sending(late_step: int) -> tuple[FakeDaemon, Client]:
    """A daemon and a connected client that reports ``late_step`` (loss 0.5) once, while the
    daemon receives the first metrics frame: a point that arrives during a send."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    on_frame = daemon.on_frame
    late = [late_step]

    def report_while_sending(conn: object, text: str) -> None:
        on_frame(conn, text)  # type: ignore[arg-type]
        if '"metrics"' in text and late:
            client.report(late.pop(), loss=0.5)

    daemon.on_frame = report_while_sending  # type: ignore[method-assign]
    return daemon, client


def test_points_reported_during_a_send_wait_for_the_next_wake() -> None:
    """One wake-up sends one frame: a point reported while that frame is being sent is not sent
    alone in a second frame, but with the next wake-up's points."""
    daemon, client = reporting_while_sending(101)
    for step in range(3):
        client.report(step, loss=1.0)
    pump(client)
    assert [b.steps for b in daemon.of_type(proto.MetricsBatch)] == [[0, 1, 2]]
    assert len(client._buffer) == 1
    pump(client)
    assert [b.steps for b in daemon.of_type(proto.MetricsBatch)] == [[0, 1, 2], [101]]


def test_a_wake_up_of_mixed_entries_sends_them_in_order_and_leaves_late_points() -> None:
    """A wake-up whose entries the common path does not take (a checkpoint between rows, two
    shapes of rows) sends them in order, and a point reported during its sends waits for the
    next wake-up, as in the common case."""
    daemon, client = reporting_while_sending(101)
    client.report(0, loss=1.0)
    client.checkpoint(0)
    client.report(1, loss=1.0, acc=0.5)
    pump(client)
    batches = daemon.of_type(proto.MetricsBatch)
    assert [b.steps for b in batches] == [[0], [1]]
    assert [c.step for c in daemon.of_type(proto.CheckpointNotice)] == [0]
    assert client.stats.sent_points == 2 and len(client._buffer) == 1
    pump(client)
    assert daemon.metric_rows()[-1] == (101, {"loss": 0.5})
    assert client.stats.sent_points == 3


def _frames_both_ways(entries: Sequence[tuple[Any, ...]]) -> tuple[list[Any], list[Any]]:
    """The frames _frames makes of ``entries`` and those the general loop makes of them."""
    client = make_client(FakeDaemon(), max_points_per_frame=1000)
    client._buffer.extend(entries)
    fast = client._sender._frames(client._buffer)
    general = client._sender._frames_general(list(entries))
    return fast, general


@pytest.mark.parametrize(
    "rows",
    [
        [{"loss": 0.5}, {"loss": 0.25}, {"loss": 1e-300}, {"loss": 3.0}],
        [{"loss": 0.5, "acc": 1}, {"acc": 0.75, "loss": 0.5}],  # ints, and names in another order
        [{"loss": math.nan}, {"loss": math.inf}, {"loss": -math.inf}],
        [{"loss": 0.5}, {"loss": 0.5, "acc": 1.0}],  # names differ: general path
        [{"loss": 0.5}, {"acc": 1.0}],  # same count, other name: general path
        [{"loss": 0.5}, {}],  # a row without metrics: general path
        [{"loss": "x"}, {"loss": 0.5}],  # a bad value: general path counts it
        [{"": 0.5}, {"": 0.5}],  # a bad name: general path drops it
        [{"loss": True}, {"loss": 0.5}],
    ],
)
def test_common_case_frames_match_the_general_loop(rows: list[dict[str, object]]) -> None:
    """The C-loop path for uniform rows encodes exactly the text of the general per-point loop
    (and the general loop takes the rows it does not cover)."""
    now = time.time()
    entries = [(step, None, now + step * 0.0008, row) for step, row in enumerate(rows)]
    fast, general = _frames_both_ways(entries)
    assert fast == general
    assert len(fast) == 1


def test_uniform_frame_only_takes_the_common_case() -> None:
    """Steps that are not ints >= 0, epochs and checkpoints go through the general loop."""
    from lrpilot._client import _CHECKPOINT, _uniform_frame

    now = 1_800_000_000.1234567
    common = [(1, None, now, {"loss": 0.5}), (2, None, now + 0.001, {"loss": 0.25})]
    assert _uniform_frame(common) == (
        '{"type":"metrics","steps":[1,2],"values":{"loss":[0.5,0.25]},'
        '"times":[null,1800000000.124]}',  # the last row's time only
        2,
    )
    for odd in [
        (3, 1, now, {"loss": 0.5}),  # an epoch
        (3.0, None, now, {"loss": 0.5}),  # a float step
        ("3", None, now, {"loss": 0.5}),  # a str step
        (-1, None, now, {"loss": 0.5}),  # a negative step
        (3, None, now, _CHECKPOINT),
        (3, None, now, {"loss": 0.5, "acc": 1.0}),  # more names
        (3, None, now, {"acc": 1.0}),  # another name
        (3, None, now, {"loss": "x"}),  # a value float() does not take
    ]:
        assert _uniform_frame([*common, odd]) is None
        fast, general = _frames_both_ways([*common, odd])
        assert fast == general


def test_checkpoint_is_sent_in_order_with_metrics() -> None:
    """A checkpoint notice is sent after the metrics reported before it and before later ones."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    client.report(1, loss=1.0)
    client.checkpoint(1)
    client.report(2, loss=0.9)
    pump(client)
    kinds = [type(m).__name__ for m in daemon.received if not isinstance(m, proto.Hello)]
    assert kinds == ["MetricsBatch", "CheckpointNotice", "MetricsBatch"]
    assert daemon.of_type(proto.CheckpointNotice) == [proto.CheckpointNotice(step=1)]


def test_overflow_drops_oldest_points_and_counts_them() -> None:
    """With the daemon away, a full buffer drops its oldest points and counts each drop."""
    daemon = FakeDaemon()
    daemon.up = False
    client = make_client(daemon, max_buffer=5)
    for step in range(12):
        client.report(step, loss=float(step))
    assert client.stats.dropped_points == 7
    daemon.up = True
    pump(client, 2)
    assert [s for s, _ in daemon.metric_rows()] == [7, 8, 9, 10, 11]


def _random_reports(
    rng: random.Random, client: Client, n: int, checkpoints: bool = True
) -> list[tuple[str, Any]]:
    """Report ``n`` random things to ``client`` (mostly loss-only floats, like a training loop,
    with other names, NaN, ints, epochs and, unless told not to, checkpoints); what each was,
    in order."""
    done: list[tuple[str, Any]] = []
    step = 0
    for _ in range(n):
        kind = rng.random()
        step += rng.random() < 0.9
        if kind < 0.6:
            metrics: dict[str, Any] = {"loss": rng.random()}
        elif kind < 0.75:
            metrics = {"loss": rng.random(), "grad_norm": rng.random() * 10}
        elif kind < 0.8:
            metrics = {"val_loss": rng.random()}
        elif kind < 0.85:
            metrics = {"loss": rng.choice([math.nan, math.inf, -math.inf])}
        elif kind < 0.9:
            metrics = {"loss": rng.random(), "n": rng.randrange(5)}
        elif kind < 0.95 or not checkpoints:
            client.report(step, epoch=step // 10, loss=0.5)
            done.append(("report", (step, {"loss": 0.5})))
            continue
        else:
            client.checkpoint(step)
            done.append(("checkpoint", step))
            continue
        client.report(step, **metrics)
        done.append(("report", (step, {k: float(v) for k, v in metrics.items()})))
    return done


def _received(daemon: FakeDaemon) -> list[tuple[str, Any]]:
    """What the fake daemon got, as _random_reports lists it (merged rows split again)."""
    out: list[tuple[str, Any]] = []
    for msg in daemon.received:
        if isinstance(msg, proto.CheckpointNotice):
            out.append(("checkpoint", msg.step))
        elif isinstance(msg, proto.MetricsBatch):
            for i, step in enumerate(msg.steps):
                row = {k: col[i] for k, col in msg.values.items() if col[i] is not None}
                out.append(("report", (step, row)))
    return out


def _same_rows(got: list[tuple[str, Any]], want: list[tuple[str, Any]]) -> bool:
    """Equal, NaN equal to NaN, with reports of one step that merged into one row joined."""

    def norm(items: list[tuple[str, Any]]) -> list[Any]:
        out: list[Any] = []
        for kind, what in items:
            if kind == "report":
                step, row = what
                row = {k: "nan" if v != v else v for k, v in row.items()}
                last = out[-1] if out else None
                if last and last[0] == "report" and last[1] == step and not set(row) & set(last[2]):
                    last[2].update(row)
                    continue
                out.append(["report", step, row])
            else:
                out.append([kind, what])
        return out

    return norm(got) == norm(want)


@pytest.mark.parametrize("seed", range(12))
def test_random_report_streams_arrive_whole_and_in_order(seed: int) -> None:
    """Whatever mix of reports and checkpoints comes, and whenever the sender wakes, the
    daemon gets every point once, in order (merged rows aside), through the common-case
    frames and the general loop alike."""
    rng = random.Random(seed)
    daemon = FakeDaemon()
    client = make_client(daemon, max_points_per_frame=rng.choice([3, 50, 2000]))
    pump(client)
    want: list[tuple[str, Any]] = []
    for _ in range(40):
        want += _random_reports(rng, client, rng.randrange(0, 30))
        pump(client)
    pump(client, 3)
    assert _same_rows(_received(daemon), want)
    assert not client._buffer


@pytest.mark.parametrize("seed", range(6))
def test_overflow_of_any_reports_drops_the_oldest(seed: int) -> None:
    """A full buffer drops its oldest points whatever they are, counts each, and sends the
    newest max_buffer points."""
    rng = random.Random(seed)
    daemon = FakeDaemon()
    daemon.up = False
    client = make_client(daemon, max_buffer=7)
    done = _random_reports(rng, client, 60, checkpoints=False)
    assert client.stats.dropped_points == len(done) - 7
    daemon.up = True
    pump(client, 3)
    assert _same_rows(_received(daemon), done[-7:])


def test_a_checkpoint_into_a_full_buffer_counts_the_point_it_drops() -> None:
    """A checkpoint notice appended to a full buffer drops the oldest point, and counts it."""
    daemon = FakeDaemon()
    daemon.up = False
    client = make_client(daemon, max_buffer=3)
    for step in range(3):
        client.report(step, loss=0.5)
    client.checkpoint(2)
    assert client.stats.dropped_points == 1
    daemon.up = True
    pump(client, 2)
    assert [s for s, _ in daemon.metric_rows()] == [1, 2]
    assert daemon.of_type(proto.CheckpointNotice) == [proto.CheckpointNotice(step=2)]


def test_steps_beyond_a_double_arrive_exactly() -> None:
    """Steps beyond 2**53 (which a double would round) are sent exactly."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    client.report(2**53, loss=0.5)
    client.report(2**60 + 1, loss=0.25)
    client.report(2**60 + 2, loss=0.125)
    pump(client)
    assert daemon.metric_rows() == [
        (2**53, {"loss": 0.5}),
        (2**60 + 1, {"loss": 0.25}),
        (2**60 + 2, {"loss": 0.125}),
    ]


def test_report_is_fast_and_never_raises() -> None:
    """report() costs microseconds and swallows even a broken buffer."""
    daemon = FakeDaemon()
    client = make_client(daemon, max_buffer=1_000_000)
    samples = []
    for step in range(5000):
        t0 = time.perf_counter_ns()
        client.report(step, loss=0.5, acc=0.9)
        samples.append(time.perf_counter_ns() - t0)
    assert statistics.median(samples) < 20_000  # generous for slow CI; the bench measures ~1 µs
    client._buffer = None  # type: ignore[assignment]
    client.report(1, loss=1.0)
    assert client.stats.report_errors == 1


# --------------------------------------------------------------------------- connection


def test_hello_carries_job_identity_and_token() -> None:
    """The hello names the job, ranks, LRs, labels and policy; the token goes in the header."""
    daemon = FakeDaemon()
    client = make_client(
        daemon,
        initial_lr=[0.1, 0.01],
        initial_momentum=0.9,
        token="s3cret",
        run_id="r1",
        rank=1,
        world_size=2,
        labels={"team": "x"},
        policy={"kind": "reduce_on_plateau"},
    )
    pump(client)
    (hello,) = daemon.of_type(proto.Hello)
    assert hello == proto.Hello(
        job="job-a",
        lrs=(0.1, 0.01),
        run_id="r1",
        rank=1,
        world_size=2,
        momentums=(0.9, 0.9),
        policy={"kind": "reduce_on_plateau"},
        labels={"team": "x"},
        client="lrpilot-py/0.1.0",
        resume=None,
    )
    assert daemon.headers[0] == {"Authorization": "Bearer s3cret"}
    assert client.stats.connected and client.stats.connects == 1


def test_reconnect_uses_exponential_backoff() -> None:
    """While the daemon is down the sender retries after 0.05, 0.1, 0.2, ... seconds (no jitter)."""
    daemon = FakeDaemon()
    daemon.up = False
    clock = FakeClock()
    client = make_client(daemon, clock=clock)
    pump(client, 9)  # attempt, wait, attempt, wait, ...
    assert daemon.connect_attempts == 5
    assert clock.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.4])
    daemon.up = True
    pump(client, 2)
    assert client.stats.connected
    assert client.stats.connect_failures == 5
    assert client._sender.backoff.attempts == 0  # reset by the successful handshake


def test_backoff_is_jittered_and_capped() -> None:
    """Backoff multiplies by factor up to maximum; jitter shortens a delay by up to half."""
    values = iter([1.0, 0.0, 0.5] + [0.0] * 20)
    backoff = Backoff(initial=1.0, maximum=8.0, factor=2.0, jitter=0.5, rng=lambda: next(values))
    delays = [backoff.next() for _ in range(7)]
    assert delays == pytest.approx([0.5, 2.0, 3.0, 8.0, 8.0, 8.0, 8.0])
    backoff.reset()
    assert backoff.next() == pytest.approx(1.0)


def test_refusal_waits_the_maximum_backoff_and_is_counted() -> None:
    """An unauthorized answer to hello is counted and the next attempt waits the maximum delay."""
    daemon = FakeDaemon()
    daemon.refuse = proto.ErrorMsg(code="unauthorized", message="bad token", ref="hello")
    clock = FakeClock()
    client = make_client(daemon, clock=clock, backoff=Backoff(maximum=7.0, rng=lambda: 0.0))
    pump(client, 2)
    assert not client.stats.connected
    assert client.stats.errors_received == 1
    assert clock.sleeps == [pytest.approx(7.0)]
    assert "unauthorized" in (client.stats.last_error or "")


def test_lost_connection_resumes_with_last_decision_and_step() -> None:
    """After a daemon restart the client resumes with what it has and gets only missed decisions."""
    daemon = FakeDaemon()
    clock = FakeClock()
    client = make_client(daemon, clock=clock)
    pump(client)
    daemon.push_decision(kind="set_lr", apply_at_step=100, lrs=[0.05])
    for step in range(10):
        client.report(step, loss=1.0)
    pump(client)
    assert client.stats.decisions_received == 1
    daemon.drop_all()
    daemon.push_decision(kind="set_lr", apply_at_step=200, lrs=[0.02])  # journaled while away
    client.report(10, loss=1.0)
    pump(client)  # send fails: connection lost
    assert not client.stats.connected and client.stats.disconnects == 1
    pump(client, 3)  # wait, reconnect, flush
    hellos = daemon.of_type(proto.Hello)
    assert len(hellos) == 2
    assert hellos[1].resume == proto.Resume(last_decision_id=1, last_step=9)
    assert [d.id for d in client.pending_decisions] == [1, 2]
    assert client.stats.decisions_received == 2
    # step 10 was in the frame whose send failed: it is resent, not lost
    assert [s for s, _ in daemon.metric_rows()].count(10) == 1


def test_duplicate_decision_is_ignored() -> None:
    """A decision id received twice is queued and applied once."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    decision = daemon.push_decision(kind="set_lr", apply_at_step=1, lrs=[0.5])
    daemon.connections[0].inbox.append(proto.encode(proto.DecisionMsg(decision=decision)))
    pump(client)
    assert len(client.pending_decisions) == 1
    assert client.stats.decisions_received == 1


def test_heartbeat_when_idle() -> None:
    """With nothing to send for heartbeat_interval, the sender sends a heartbeat with the last step."""
    daemon = FakeDaemon()
    clock = FakeClock()
    client = make_client(daemon, clock=clock, heartbeat_interval=5.0)
    pump(client)
    client.report(3, loss=1.0)
    pump(client)
    assert daemon.of_type(proto.Heartbeat) == []
    clock.now += 6.0
    pump(client)
    assert daemon.of_type(proto.Heartbeat) == [proto.Heartbeat(step=3)]


def test_bad_frame_from_daemon_is_counted_not_fatal() -> None:
    """An undecodable frame from the daemon is counted and the connection stays up."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    daemon.connections[0].inbox.append('{"type":"decision","id":"x"}')
    pump(client)
    assert client.stats.errors_received == 1
    assert client.stats.connected


# --------------------------------------------------------------------------- decisions


def test_decision_applies_exactly_at_apply_at_step_and_is_acked_once() -> None:
    """The LR changes at apply_at_step, not before, and one ack carries that step."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    daemon.push_decision(kind="set_lr", apply_at_step=5, lrs=[0.01])
    pump(client)
    assert client.lrs_for_step(4) == [0.1]
    pump(client)
    assert daemon.of_type(proto.Ack) == []
    assert client.lrs_for_step(5) == [0.01]
    assert client.lrs_for_step(6) == [0.01]
    pump(client, 3)
    assert daemon.of_type(proto.Ack) == [proto.Ack(id=1, applied_at_step=5)]
    assert [(d.id, s) for d, s in client.decisions] == [(1, 5)]


def test_late_decision_applies_at_the_next_step_asked() -> None:
    """A decision whose apply step has passed applies at the next step and acks that step."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    client.lrs_for_step(7)
    daemon.push_decision(kind="set_lr", apply_at_step=3, lrs=[0.2])
    pump(client)
    assert client.lrs_for_step(8) == [0.2]
    pump(client)
    assert daemon.of_type(proto.Ack) == [proto.Ack(id=1, applied_at_step=8)]


def test_decisions_apply_in_apply_step_order() -> None:
    """Decisions received out of order apply by apply_at_step."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    daemon.push_decision(kind="set_lr", apply_at_step=20, lrs=[0.3])
    daemon.push_decision(kind="set_lr", apply_at_step=10, lrs=[0.2])
    pump(client)
    assert client.lrs_for_step(10) == [0.2]
    assert client.lrs_for_step(25) == [0.3]


def test_single_value_keeps_param_group_ratios() -> None:
    """set_lr with one value for two groups scales both, keeping their ratio."""
    daemon = FakeDaemon()
    client = make_client(daemon, initial_lr=[0.1, 0.01])
    pump(client)
    daemon.push_decision(kind="set_lr", apply_at_step=0, lrs=[0.05])
    pump(client)
    assert client.lrs_for_step(0) == pytest.approx([0.05, 0.005])
    assert client.lr == pytest.approx(0.05)


def test_mismatched_group_count_is_refused_and_lr_kept() -> None:
    """A decision with 3 LRs for 2 groups is not applied nor acked; the LR stays."""
    daemon = FakeDaemon()
    client = make_client(daemon, initial_lr=[0.1, 0.01])
    pump(client)
    daemon.push_decision(kind="set_lr", apply_at_step=0, lrs=[0.1, 0.2, 0.3])
    pump(client)
    assert client.lrs_for_step(0) == [0.1, 0.01]
    pump(client)
    assert daemon.of_type(proto.Ack) == []
    assert client.stats.decision_errors == 1


def test_schedule_decision_is_evaluated_locally_every_step() -> None:
    """A schedule decision installs a segment that gives the LR at each later step."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    segment = {
        "kind": "warmup",
        "origin_step": 10,
        "params": {"total_iters": 4, "start_factor": 0.5},
        "then": {"kind": "constant", "params": {"lrs": [0.2]}},
    }
    daemon.push_decision(kind="schedule", apply_at_step=10, schedule=segment)
    pump(client)
    assert client.lrs_for_step(9) == [0.1]
    got = [client.lrs_for_step(s)[0] for s in range(10, 16)]
    assert got == pytest.approx([0.1, 0.125, 0.15, 0.175, 0.2, 0.2])
    # a later set_lr replaces the segment
    daemon.push_decision(kind="set_lr", apply_at_step=20, lrs=[0.03])
    pump(client)
    assert client.lrs_for_step(20) == [0.03]
    assert client.lrs_for_step(30) == [0.03]


def test_one_value_segment_keeps_group_ratios() -> None:
    """A segment with one LR for a two-group job keeps the ratio the groups had."""
    daemon = FakeDaemon()
    client = make_client(daemon, initial_lr=[0.1, 0.05])
    pump(client)
    segment = {"kind": "constant", "origin_step": 0, "params": {"lrs": [0.4]}}
    daemon.push_decision(kind="schedule", apply_at_step=0, schedule=segment)
    pump(client)
    assert client.lrs_for_step(0) == pytest.approx([0.4, 0.2])


def test_unusable_segment_keeps_last_lr() -> None:
    """A segment of an unknown kind is refused at its apply step; the LR stays as it was."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    daemon.push_decision(kind="schedule", apply_at_step=2, schedule={"kind": "zigzag"})
    pump(client)
    assert [client.lrs_for_step(s)[0] for s in range(4)] == [0.1] * 4
    assert client.stats.decision_errors == 1
    assert client.decisions == []


def test_momentum_from_decision() -> None:
    """A decision with momentums sets them for every group (one value broadcast)."""
    daemon = FakeDaemon()
    client = make_client(daemon, initial_lr=[0.1, 0.1], initial_momentum=[0.9, 0.9])
    pump(client)
    daemon.push_decision(kind="set_lr", apply_at_step=1, lrs=[0.05], momentums=[0.8])
    pump(client)
    client.lrs_for_step(1)
    assert client.momentums == [0.8, 0.8]


def test_halt_sets_halted_at_its_step() -> None:
    """halted becomes true at apply_at_step with the decision's reason."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    daemon.push_decision(kind="halt", apply_at_step=3, reason="loss is NaN")
    pump(client)
    client.lrs_for_step(2)
    assert not client.halted
    client.lrs_for_step(3)
    assert client.halted and client.halt_reason == "loss is NaN"


def test_callbacks_see_rollback_on_the_training_thread() -> None:
    """on_decision is called with the rollback decision and the step it applied at."""
    daemon = FakeDaemon()
    seen: list[tuple[Decision, int, str]] = []
    client = make_client(
        daemon, on_decision=lambda d, s: seen.append((d, s, threading.current_thread().name))
    )
    pump(client)
    daemon.push_decision(
        kind="rollback", apply_at_step=50, lrs=[0.05], rollback_to_step=40, skip_batches=8
    )
    pump(client)
    assert client.lrs_for_step(50) == [0.05]
    ((decision, step, thread),) = seen
    assert decision.kind is DecisionKind.ROLLBACK
    assert (decision.rollback_to_step, decision.skip_batches, step) == (40, 8, 50)
    assert thread == threading.current_thread().name


def test_failing_callback_still_acks_and_reraises() -> None:
    """An exception in a user callback reaches the caller, after the decision is applied and acked."""
    daemon = FakeDaemon()

    def hook(decision: Decision, step: int) -> None:
        raise RuntimeError("user hook failed")

    client = make_client(daemon, on_decision=hook)
    pump(client)
    daemon.push_decision(kind="set_lr", apply_at_step=0, lrs=[0.5])
    pump(client)
    with pytest.raises(RuntimeError, match="user hook failed"):
        client.lrs_for_step(0)
    assert client.lrs == [0.5]
    pump(client)
    assert daemon.of_type(proto.Ack) == [proto.Ack(id=1, applied_at_step=0)]


def test_welcome_decisions_are_queued() -> None:
    """Decisions carried by the welcome (for example the initial schedule) are queued."""
    daemon = FakeDaemon()
    daemon.push_decision(kind="set_lr", apply_at_step=0, lrs=[0.3])
    client = make_client(daemon)
    pump(client)
    assert client.lrs_for_step(0) == [0.3]


def test_external_lr_change_warns_once_and_reports_metric() -> None:
    """An LR changed behind lrpilot's back warns once, counts, and is reported as a metric."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client.external_lr_change(5, 0, expected=0.1, found=0.3)
        client.external_lr_change(6, 0, expected=0.1, found=0.3)
    assert len([w for w in caught if "changed outside lrpilot" in str(w.message)]) == 1
    pump(client)
    assert daemon.metric_rows() == [
        (5, {"lrpilot_external_lr_changes": 1.0}),
        (6, {"lrpilot_external_lr_changes": 2.0}),
    ]


# --------------------------------------------------------------------------- close / fail-open


def test_close_flushes_and_sends_finished() -> None:
    """close() sends what is buffered and then finished with the last step."""
    daemon = FakeDaemon()
    client = make_client(daemon)
    pump(client)
    client.report(41, loss=0.1)
    client.report(42, loss=0.1)
    client.close()
    assert [s for s, _ in daemon.metric_rows()] == [41, 42]
    assert daemon.of_type(proto.Finished) == [proto.Finished(step=42)]
    assert daemon.connections[-1].closed


def test_close_without_daemon_counts_lost_points() -> None:
    """close() with no daemon gives up at once and counts the unsent points as dropped."""
    daemon = FakeDaemon()
    daemon.up = False
    client = make_client(daemon)
    client.report(1, loss=1.0)
    client.report(2, loss=1.0)
    client.close()
    assert client.stats.dropped_points == 2
    assert daemon.of_type(proto.Finished) == []


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_fail_open_with_no_daemon_real_transport() -> None:
    """With nothing listening, training goes on: report() stays fast, LR stays, close() is bounded."""
    port = _closed_port()
    client = Client(f"ws://127.0.0.1:{port}/ws", "job-a", 0.1, close_timeout=1.0)
    samples = []
    for step in range(2000):
        t0 = time.perf_counter_ns()
        client.report(step, loss=0.5)
        samples.append(time.perf_counter_ns() - t0)
        assert client.lrs_for_step(step) == [0.1]
    time.sleep(0.2)
    assert client.stats.connect_failures >= 1
    assert not client.stats.connected
    started = time.monotonic()
    client.close()
    assert time.monotonic() - started < 1.5
    assert statistics.median(samples) < 20_000


def test_threaded_client_streams_and_follows_decisions() -> None:
    """With the real sender thread, points arrive, a decision applies at its step and is acked."""
    daemon = FakeDaemon()
    with Client(URL, "job-a", 0.1, transport=daemon, flush_interval=0.002) as client:
        assert client.wait_connected(2.0)
        daemon.push_decision(kind="set_lr", apply_at_step=50, lrs=[0.01])
        deadline = time.monotonic() + 2.0
        while not client.pending_decisions and time.monotonic() < deadline:
            time.sleep(0.001)
        lrs = []
        for step in range(100):
            lrs.append(client.lrs_for_step(step)[0])
            client.report(step, loss=1.0)
        assert client.flush(2.0)
    assert lrs == [0.1] * 50 + [0.01] * 50
    assert [s for s, _ in daemon.metric_rows()] == list(range(100))
    assert daemon.of_type(proto.Ack) == [proto.Ack(id=1, applied_at_step=50)]
    assert daemon.of_type(proto.Finished) == [proto.Finished(step=99)]


def test_threaded_client_receives_decisions_between_wake_ups() -> None:
    """The receiver thread takes a decision as it arrives, not at the sender's next wake-up;
    a lost connection wakes the sender at once to reconnect; close() does not wait for the
    sender's next wake-up."""
    daemon = FakeDaemon()
    client = Client(URL, "job-a", 0.1, transport=daemon, flush_interval=30.0)
    try:
        assert client.wait_connected(2.0)
        time.sleep(0.05)  # the sender now waits out its 30 s flush interval
        daemon.push_decision(kind="set_lr", apply_at_step=5, lrs=[0.01])
        deadline = time.monotonic() + 2.0
        while not client.pending_decisions and time.monotonic() < deadline:
            time.sleep(0.001)
        assert [d.id for d in client.pending_decisions] == [1]
        daemon.drop_all()  # a daemon restart
        deadline = time.monotonic() + 2.0
        while client.stats.connects < 2 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert client.stats.connects == 2
        assert client.stats.disconnects == 1
        hello = daemon.of_type(proto.Hello)[-1]
        assert hello.resume == proto.Resume(last_decision_id=1, last_step=None)
        client.report(3, loss=0.5)
        started = time.monotonic()
    finally:
        client.close(timeout=2.0)
    assert time.monotonic() - started < 1.0
    assert [s for s, _ in daemon.metric_rows()] == [3]
    assert daemon.of_type(proto.Finished) == [proto.Finished(step=3)]
    assert client._sender.done.is_set()


def test_idle_sender_sleeps_until_the_training_thread_has_something() -> None:
    """After a whole flush interval without a report the sender stops waking every interval;
    a report, a checkpoint or an applied decision's ack wakes it and goes out at once."""
    daemon = FakeDaemon()
    client = Client(URL, "job-a", 0.1, transport=daemon, flush_interval=0.01)
    try:
        assert client.wait_connected(2.0)
        sender = client._sender
        wakes = []
        run_once = sender.run_once

        def counted() -> None:
            wakes.append(time.monotonic())
            run_once()

        sender.run_once = counted  # type: ignore[method-assign]
        time.sleep(0.4)  # 40 flush intervals with nothing to send
        assert len(wakes) <= 3
        assert client._sender_idle

        def wait_for(what: type, count: int) -> None:
            deadline = time.monotonic() + 1.0  # far less than the 5 s heartbeat interval
            while len(daemon.of_type(what)) < count and time.monotonic() < deadline:
                time.sleep(0.001)
            assert len(daemon.of_type(what)) == count

        client.report(1, loss=0.5)
        wait_for(proto.MetricsBatch, 1)
        time.sleep(0.1)
        client.checkpoint(1)
        wait_for(proto.CheckpointNotice, 1)
        daemon.push_decision(kind="set_lr", apply_at_step=2, lrs=[0.01])
        deadline = time.monotonic() + 1.0
        while not client.pending_decisions and time.monotonic() < deadline:
            time.sleep(0.001)
        time.sleep(0.1)
        assert client._sender_idle
        assert client.lrs_for_step(2) == [0.01]  # no report at this step: the ack wakes it
        wait_for(proto.Ack, 1)
        assert daemon.metric_rows() == [(1, {"loss": 0.5})]
    finally:
        client.close(timeout=2.0)


def test_invalid_arguments_are_refused() -> None:
    """Bad job names, ranks and LRs fail at construction with the argument named."""
    with pytest.raises(ValueError, match="job: invalid job name"):
        Client(URL, "a/b", 0.1, start=False)
    with pytest.raises(ValueError, match="rank"):
        Client(URL, "a", 0.1, rank=2, world_size=2, start=False)
    with pytest.raises(ValueError, match="initial_lr"):
        Client(URL, "a", [math.nan], start=False)
    with pytest.raises(ValueError, match="initial_momentum"):
        Client(URL, "a", [0.1, 0.1], initial_momentum=[0.9], start=False)


def test_report_converts_cpu_tensors_on_the_training_thread() -> None:
    """A 0-d CPU tensor is a float in the buffer at once; a tensor that is no scalar is left for the sender to count as bad."""
    torch = pytest.importorskip("torch")
    client = Client("ws://127.0.0.1:9/ws", "conv", 0.1, start=False)
    client.report(0, loss=torch.tensor(1.5), bad=torch.ones(3), n=2)
    ((_, _, _, metrics),) = list(client._buffer)
    assert metrics["loss"].__class__ is float and metrics["loss"] == 1.5
    assert metrics["n"] == 2  # not a tensor: untouched
    assert not isinstance(metrics["bad"], float)
    assert client.stats.report_errors == 0


def test_torch_pilot_step_reports_like_report() -> None:
    """LRPilot.step hands its own metrics dict to the client: the same buffer entry as
    Client.report, CPU tensors already floats, and the LR of the next step set."""
    torch = pytest.importorskip("torch")
    from lrpilot.torch import LRPilot

    daemon = FakeDaemon()
    client = make_client(daemon)
    optimizer = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1, momentum=0.9)
    pilot = LRPilot(optimizer, client)
    pump(client)
    daemon.push_decision(kind="set_lr", apply_at_step=1, lrs=[0.05])
    pump(client)
    assert pilot.step(0, loss=torch.tensor(0.5), acc=1) == [0.05]
    assert optimizer.param_groups[0]["lr"] == 0.05
    ((step, epoch, _, metrics),) = list(client._buffer)
    assert (step, epoch, metrics) == (0, None, {"loss": 0.5, "acc": 1})
    assert metrics["loss"].__class__ is float
    assert pilot.step(1) == [0.05]  # no metrics: nothing reported
    assert len(client._buffer) == 1
    pump(client)
    assert daemon.metric_rows() == [(0, {"loss": 0.5, "acc": 1.0})]


@pytest.mark.parametrize(
    "values",
    [
        {"loss": [0.5, 1e-300, 3.0]},
        {"loss": [0.5, 1e300, 2.0], "naïve/acc": [1.0, 0.5, -0.0], 'q"uote': [5e-324, -7.25, 7.0]},
        {"loss": [math.nan, math.inf, -math.inf]},  # written as strings, as encode() does
        {"loss": [0.5, 0.25, 1.0], "grad_norm": [1.0, math.inf, 2.0]},
    ],
)
def test_encode_metrics_is_the_text_of_encode(values: dict[str, list[float]]) -> None:
    """The sender's shortcut encodes a metrics frame to exactly the text encode() gives for
    the frame with the last row's time only."""
    steps, last_time = [7, 8, 9], 1_800_000_000.124
    text = proto.encode_metrics(steps, values, last_time)
    times: list[float | None] = [None, None, last_time]
    wire: dict[str, list[float | None]] = {k: list(v) for k, v in values.items()}
    assert text == proto.encode(proto.MetricsBatch(steps=steps, values=wire, times=times))
    assert proto.decode(text) == proto.MetricsBatch(steps=steps, values=wire, times=times)


@pytest.mark.parametrize(
    ("steps", "values"),
    [
        ([7.0, 8.0], {"loss": [0.5, 0.25]}),  # float steps
        ([7, 8], {"loss": [1, 0.25]}),  # an int value
        ([7, 8], {"loss": [math.nan, None]}),  # None, with a NaN elsewhere
        ([7.0, 8], {"loss": [math.nan, 0.25]}),  # a float step, with a NaN
    ],
)
def test_encode_metrics_refuses_what_is_not_ints_and_floats(
    steps: list[Any], values: dict[str, list[Any]]
) -> None:
    """Steps that are not ints or values that are not floats raise TypeError (the sender then
    converts the values or takes its general path), NaN or not."""
    with pytest.raises(TypeError):
        proto.encode_metrics(steps, values, 1_800_000_000.0)


# --------------------------------------------------------------------------- batching


def _arrivals(daemon: FakeDaemon) -> list[tuple[float, proto.Message]]:
    """Record the monotonic time at which each frame reaches the fake daemon."""
    arrived: list[tuple[float, proto.Message]] = []
    on_frame = daemon.on_frame

    def timed(conn: Any, text: str) -> None:
        on_frame(conn, text)
        arrived.append((time.monotonic(), proto.decode(text)))

    daemon.on_frame = timed  # type: ignore[method-assign]
    return arrived


def _wait_until(what: Any, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not what():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def test_nonfinite_value_is_sent_at_once_not_after_the_flush_interval() -> None:
    """Finite points wait for the sender's next wake-up; a NaN (float or CPU tensor) wakes it at
    once and goes out with them; a second NaN within the interval waits like any point."""
    daemon = FakeDaemon()
    arrived = _arrivals(daemon)
    client = Client(URL, "job-a", 0.1, transport=daemon, flush_interval=30.0)
    try:
        assert client.wait_connected(2.0)
        client.report(0, loss=1.0)  # the idle sender takes it at once, then waits 30 s
        assert _wait_until(lambda: client.stats.sent_points == 1)
        client.report(1, loss=0.9)
        client.report(2, loss=0.8)
        time.sleep(0.2)
        assert client.stats.sent_points == 1  # batched: they wait for the next wake-up
        reported = time.monotonic()
        client.report(3, loss=math.nan)
        assert _wait_until(lambda: client.stats.sent_points == 4)
        sent_at, batch = arrived[-1]
        assert isinstance(batch, proto.MetricsBatch)
        assert batch.steps == [1, 2, 3] and math.isnan(batch.values["loss"][2])  # type: ignore[arg-type]
        assert sent_at - reported < 1.0  # not the 30 s of the flush interval
        client.report(4, loss=math.inf)  # early wake-ups: at most one per flush interval
        time.sleep(0.2)
        assert client.stats.sent_points == 4
    finally:
        client.close(timeout=2.0)
    assert [s for s, _ in daemon.metric_rows()] == [0, 1, 2, 3, 4]  # close() flushed it


def test_nonfinite_cpu_tensor_and_checkpoint_wake_the_sender() -> None:
    """A NaN in a CPU tensor is seen once converted and goes out at once; so does a checkpoint
    notice right after it (each kind has its own limit of one early wake-up per interval)."""
    torch = pytest.importorskip("torch")
    daemon = FakeDaemon()
    client = Client(URL, "job-a", 0.1, transport=daemon, flush_interval=30.0)
    try:
        assert client.wait_connected(2.0)
        client.report(0, loss=1.0)
        assert _wait_until(lambda: client.stats.sent_points == 1)
        client.report(1, loss=0.5)
        client.report(2, loss=torch.tensor(float("inf")))
        assert _wait_until(lambda: client.stats.sent_points == 3)
        client.report(3, loss=0.5)
        client.checkpoint(3)
        assert _wait_until(lambda: bool(daemon.of_type(proto.CheckpointNotice)))
        assert client.stats.sent_points == 4
        client.report(4, loss=0.5)
        client.checkpoint(4)  # the second within the interval waits like any point
        time.sleep(0.2)
        assert len(daemon.of_type(proto.CheckpointNotice)) == 1
    finally:
        client.close(timeout=2.0)
    assert daemon.of_type(proto.CheckpointNotice) == [
        proto.CheckpointNotice(step=3),
        proto.CheckpointNotice(step=4),
    ]


def test_flush_sends_at_once() -> None:
    """flush() does not wait for the sender's next wake-up."""
    daemon = FakeDaemon()
    client = Client(URL, "job-a", 0.1, transport=daemon, flush_interval=30.0)
    try:
        assert client.wait_connected(2.0)
        client.report(0, loss=1.0)
        assert _wait_until(lambda: client.stats.sent_points == 1)
        client.report(1, loss=0.5)
        started = time.monotonic()
        assert client.flush(5.0)
        assert time.monotonic() - started < 1.0
        assert [s for s, _ in daemon.metric_rows()] == [0, 1]
    finally:
        client.close(timeout=2.0)


def test_frames_carry_more_points_when_steps_come_faster() -> None:
    """Steps faster than the flush interval share frames (one wake-up per interval); steps
    slower than it are sent one by one, each as soon as it is reported."""
    sizes: dict[str, list[int]] = {}
    for pace, pause in (("fast", 0.001), ("slow", 0.12)):
        daemon = FakeDaemon()
        arrived = _arrivals(daemon)
        client = Client(URL, "job-a", 0.1, transport=daemon, flush_interval=0.05)
        try:
            assert client.wait_connected(2.0)
            waited = []
            for step in range(200 if pace == "fast" else 5):
                client.report(step, loss=1.0)
                if pace == "slow":
                    reported = time.monotonic()
                    assert _wait_until(lambda c=client, s=step: c.stats.sent_points == s + 1)  # type: ignore[misc]
                    waited.append(arrived[-1][0] - reported)
                time.sleep(pause)
            assert client.flush(2.0)
        finally:
            client.close(timeout=2.0)
        sizes[pace] = [len(b.steps) for b in daemon.of_type(proto.MetricsBatch)]
        if pace == "slow":  # sent at once: well inside the 50 ms flush interval, as a rule
            assert statistics.median(waited) < 0.04
    assert sizes["slow"] == [1] * 5
    assert sum(sizes["fast"]) == 200
    assert statistics.mean(sizes["fast"]) >= 10  # 200 steps of >= 1 ms in 50 ms wake-ups

"""lrpilot replay: every input format, parity with torch, bad input reported by line."""

from __future__ import annotations

import csv
import io
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from monitor.cli import main
from monitor.config import load_policy_file
from monitor.replay import replay

ROOT = Path(__file__).resolve().parent.parent


def records(n: int = 80, seed: int = 1) -> list[dict[str, float | int]]:
    rng = random.Random(seed)
    out: list[dict[str, float | int]] = []
    for step in range(n):
        rec: dict[str, float | int] = {"step": step, "loss": 1.0 / (1 + step) + rng.random() * 0.05}
        if step % 4 == 3:
            rec["val_loss"] = max(0.6, 1.0 - step * 0.01) + rng.random() * 0.01
        out.append(rec)
    return out


def write_jsonl(path: Path, recs: list[dict[str, float | int]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def write_csv(path: Path, recs: list[dict[str, float | int]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["step", "loss", "val_loss"])
        writer.writeheader()
        for r in recs:
            writer.writerow({k: r.get(k, "") for k in ("step", "loss", "val_loss")})
    return path


def write_tensorboard(directory: Path, recs: list[dict[str, float | int]]) -> Path:
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(log_dir=str(directory))
    for r in recs:
        for key, value in r.items():
            if key != "step":
                writer.add_scalar(key, value, int(r["step"]))
    writer.close()
    return directory


def run_replay(policy: Path, path: Path, initial: list[float] | None = None, strict: bool = False) -> tuple[int, list[dict], str]:
    out, err = io.StringIO(), io.StringIO()
    code = replay(load_policy_file(policy), path, initial or [0.1], out, err, strict=strict)
    return code, [json.loads(line) for line in out.getvalue().splitlines()], err.getvalue()


@pytest.fixture
def rop_policy(tmp_path: Path) -> Path:
    path = tmp_path / "policy.yaml"
    path.write_text("kind: reduce_on_plateau\nmonitor: val_loss\nfactor: 0.5\npatience: 1\nthreshold: 0.01\n")
    return path


def test_every_input_format_gives_the_same_lr_sequence(tmp_path: Path, rop_policy: Path) -> None:
    """JSONL, CSV and a TensorBoard log directory of the same run replay to the same LRs."""
    recs = records()
    results = {}
    for name, path in (
        ("jsonl", write_jsonl(tmp_path / "run.jsonl", recs)),
        ("csv", write_csv(tmp_path / "run.csv", recs)),
        ("tb", write_tensorboard(tmp_path / "tb", recs)),
    ):
        code, lines, err = run_replay(rop_policy, path)
        assert code == 0, err
        assert len(lines) == len(recs)
        results[name] = [(line["step"], line["lr"]) for line in lines]
    # TensorBoard stores float32 scalars; the plateau decisions land on the same steps anyway
    assert results["jsonl"] == results["csv"]
    assert [s for s, _ in results["tb"]] == [s for s, _ in results["jsonl"]]
    assert [lr for _, lr in results["tb"]] == pytest.approx([lr for _, lr in results["jsonl"]], rel=1e-12)
    assert min(lr for _, lr in results["jsonl"]) < 0.1  # the run did plateau


def test_replay_matches_torch_reduce_on_plateau(tmp_path: Path, rop_policy: Path) -> None:
    """replay's LR after each record equals torch's ReduceLROnPlateau stepped on the same values."""
    import torch

    recs = records(200, seed=7)
    code, lines, _ = run_replay(rop_policy, write_jsonl(tmp_path / "run.jsonl", recs))
    assert code == 0
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="min", factor=0.5, patience=1, threshold=0.01)
    expected = []
    for r in recs:
        if "val_loss" in r:
            sched.step(r["val_loss"])
        expected.append(opt.param_groups[0]["lr"])
    assert [line["lr"] for line in lines] == expected


def test_replay_matches_torch_cyclic_with_warmup_per_group(tmp_path: Path) -> None:
    """A warmup in front of cosine restarts, two param groups, equals torch's SequentialLR."""
    import torch

    policy = tmp_path / "p.yaml"
    policy.write_text("kind: cosine_restarts\nT_0: 7\nT_mult: 2\neta_min: 0.001\nwarmup: {total_iters: 5, start_factor: 0.2}\n")
    recs = records(60)
    code, lines, _ = run_replay(policy, write_jsonl(tmp_path / "run.jsonl", recs), [0.1, 0.02])
    assert code == 0
    params = [torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))]
    opt = torch.optim.SGD([{"params": [params[0]], "lr": 0.1}, {"params": [params[1]], "lr": 0.02}])
    warm = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.2, end_factor=1.0, total_iters=5)
    cos = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=7, T_mult=2, eta_min=0.001)
    seq = torch.optim.lr_scheduler.SequentialLR(opt, [warm, cos], milestones=[5])
    for line in lines:
        seq.step()
        assert line["lrs"] == pytest.approx([g["lr"] for g in opt.param_groups], rel=1e-12, abs=0)


def test_nan_values_cross_replay_and_are_detected(tmp_path: Path) -> None:
    """A "NaN" string and a bare NaN token in JSONL both reach the non_finite detector."""
    policy = tmp_path / "p.yaml"
    policy.write_text("kind: constant\ndetectors:\n  non_finite: {response: none}\n")
    run = tmp_path / "run.jsonl"
    run.write_text('{"step": 0, "loss": 1.0}\n{"step": 1, "loss": "NaN"}\n{"step": 2, "loss": NaN}\n{"step": 3, "loss": "-Infinity"}\n')
    code, lines, _ = run_replay(policy, run)
    assert code == 0
    assert [len(line.get("detections", [])) for line in lines] == [0, 1, 1, 1]
    assert lines[3]["detections"][0]["value"] == "-Infinity"


def test_malformed_records_are_reported_by_line_and_skipped(tmp_path: Path, rop_policy: Path) -> None:
    """Bad lines are named by file and line number and skipped; the rest is replayed."""
    run = tmp_path / "run.jsonl"
    run.write_text('{"step": 0, "loss": 1}\n{"step": 1, "loss": "abc"}\n{not json\n{"loss": 2}\n{"step": 4, "loss": 1}\n')
    code, lines, err = run_replay(rop_policy, run)
    assert code == 0
    assert [line["step"] for line in lines] == [0, 4]
    assert f"{run}: line 2: loss: expected a number, got 'abc'" in err
    assert f"{run}: line 3: invalid JSON" in err
    assert f"{run}: line 4: step: missing" in err
    assert "skipped 3 malformed record(s)" in err


def test_strict_stops_at_the_first_malformed_record(tmp_path: Path, rop_policy: Path) -> None:
    """--strict stops with exit status 2 at the first bad line."""
    run = tmp_path / "run.jsonl"
    run.write_text('{"step": 0, "loss": 1}\n{"step": 1, "loss": "abc"}\n{"step": 2, "loss": 1}\n')
    code, lines, err = run_replay(rop_policy, run, strict=True)
    assert code == 2 and len(lines) == 1 and "line 2" in err


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("kind: reduce_on_plateau\nfactor: 1.5\n", "policy.factor: must be > 0 and < 1"),
        ("kind: reduce_on_plateau\npatience: -1\n", "policy.patience"),
        ("kind: reduce_on_plateau\nfactr: 0.5\n", "policy.factr: unknown parameter for reduce_on_plateau"),
        ("kind: reduce_on_plateau\npatience: many\n", "policy.patience: Input should be a valid integer"),
        ("kind: cyclic\nbase_lr: 0.1\nmax_lr: 0.01\n", "policy.max_lr"),
        ("kind: cosine_restarts\nT_0: 10\nT_mult: 0\n", "policy.T_mult"),
        ("kind: sgdr\n", "policy.kind: unknown policy 'sgdr'"),
        ("kind: constant\nwarmup: {total_iters: 10, start_factor: 2}\n", "policy.warmup.start_factor"),
        ("kind: constant\ndetectors:\n  spike: {z_threshold: -1}\n", "policy.detectors.spike.z_threshold"),
        ("kind: constant\n  bad: [indent\n", "line 2"),
    ],
)
def test_bad_policy_files_are_refused_with_file_field_and_reason(tmp_path: Path, text: str, message: str) -> None:
    """A bad policy file exits non-zero naming the file, the field path and the reason."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(text)
    run = write_jsonl(tmp_path / "run.jsonl", records(3))
    result = subprocess.run(
        [sys.executable, "-m", "monitor", "replay", str(run), "--policy", str(policy)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": f"{ROOT}:{ROOT / 'clients'}", "PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode == 2
    assert str(policy) in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_prints_one_json_line_per_record(tmp_path: Path, rop_policy: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI entry point writes parseable JSON lines with step and lr, and lrs for several groups."""
    run = write_jsonl(tmp_path / "run.jsonl", records(10))
    assert main(["replay", str(run), "--policy", str(rop_policy), "--initial-lr", "0.1,0.01"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 10
    assert all(set(line) >= {"step", "lr", "lrs"} for line in lines)
    assert lines[0]["lrs"] == [0.1, 0.01]
    assert all(math.isfinite(line["lr"]) for line in lines)

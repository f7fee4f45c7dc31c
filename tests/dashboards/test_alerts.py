"""The Prometheus alerting rules load and pass their promtool unit tests."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ALERTS = Path(__file__).resolve().parents[2] / "dashboards" / "alerts"
RULES = ALERTS / "lrpilot-rules.yml"
RULE_TESTS = ALERTS / "lrpilot-rules.test.yml"
EXPECTED = {
    "LrpilotJobNaN",
    "LrpilotJobHalted",
    "LrpilotJobRolledBack",
    "LrpilotJobStale",
    "LrpilotLRAtFloor",
    "LrpilotRejectingFrames",
}

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="promtool is not installed"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [shutil.which("promtool") or "promtool", *args],
        cwd=ALERTS,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_promtool_check_rules() -> None:
    """`promtool check rules` accepts the rule file."""
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(EXPECTED)} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    """`promtool test rules` passes every firing and non-firing case."""
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_has_labels_annotations_and_tests() -> None:
    """Each alert has a severity, a summary and description naming the job, and firing and quiet cases."""
    rules = [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]
    assert {r["alert"] for r in rules} == EXPECTED
    for rule in rules:
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"]
        if rule["alert"] != "LrpilotRejectingFrames":  # a daemon-wide alert, no job
            assert "$labels.training_job" in rule["annotations"]["summary"], rule["alert"]
    cases = [
        c for t in yaml.safe_load(RULE_TESTS.read_text())["tests"] for c in t["alert_rule_test"]
    ]
    for name in EXPECTED:
        own = [c for c in cases if c["alertname"] == name]
        assert any(c["exp_alerts"] for c in own), f"{name} never fires in the tests"
        assert any(not c["exp_alerts"] for c in own), f"{name} has no not-firing case"


def test_unit_tests_catch_a_broken_rule(tmp_path: Path) -> None:
    """A rule that no longer fires makes `promtool test rules` fail, so the tests can fail."""
    broken = RULES.read_text().replace(
        'lrpilot_job_state{state="halted"} == 1', 'lrpilot_job_state{state="halted"} == 2'
    )
    assert broken != RULES.read_text()
    (tmp_path / RULES.name).write_text(broken)
    shutil.copy(RULE_TESTS, tmp_path / RULE_TESTS.name)
    result = subprocess.run(
        [shutil.which("promtool") or "promtool", "test", "rules", RULE_TESTS.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "LrpilotJobHalted" in result.stdout + result.stderr

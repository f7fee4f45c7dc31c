"""config.yaml: defaults, validation messages with file and field path, env overrides, job rules."""

from __future__ import annotations

from pathlib import Path

import pytest

from monitor.config import Config, ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent


def test_the_shipped_config_is_valid_and_matches_the_defaults() -> None:
    """The repository's config.yaml loads and says what the built-in defaults say."""
    shipped = load_config(ROOT / "config.yaml", environ={})
    builtin = load_config(None, environ={})
    assert shipped.server == builtin.server
    assert shipped.defaults == builtin.defaults


def test_no_file_gives_working_defaults() -> None:
    """With no file every section has defaults, loopback host included."""
    config = load_config(None, environ={})
    assert config.server.host == "127.0.0.1"
    assert config.server.port == 8765
    spec = config.job_spec_for("any", {})
    assert spec.policy.kind == "reduce_on_plateau"
    assert {d.name for d in spec.detectors} == {
        "non_finite",
        "spike",
        "divergence",
        "oscillation",
        "overshoot",
        "slow_progress",
        "stalled",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server:\n  port: 70000\n", "server.port: Input should be less than or equal to 65535"),
        ("server:\n  prot: 1\n", "server.prot: unknown field"),
        ("defaults:\n  policy: {kind: reduce_on_plateau, factor: 2}\n", "defaults.policy.factor: must be > 0 and < 1"),
        ("jobs:\n  - match: {name: 'a*'}\n    policy: {kind: cyclic, base_lr: 1, max_lr: 0.1}\n", "jobs[0].policy.max_lr"),
        ("defaults:\n  detectors: {spikes: {}}\n", "defaults.detectors.spikes: unknown detector"),
        ("auth:\n  tokens: [{token: short}]\n", "auth.tokens[0].token"),
        ("server: [1, 2\n", "line 2, column 1: invalid YAML"),
        ("- just\n- a list\n", "expected a mapping at the top level"),
    ],
)
def test_bad_files_name_file_field_and_reason(tmp_path: Path, text: str, message: str) -> None:
    """Each kind of mistake is refused with the file name, the field path and the reason."""
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert str(path) in str(info.value)
    assert message in str(info.value)


def test_environment_overrides_the_file(tmp_path: Path) -> None:
    """LRPILOT_SECTION__KEY variables override the file, and token variables add tokens."""
    path = tmp_path / "config.yaml"
    path.write_text("server:\n  port: 9000\n")
    env = {"LRPILOT_SERVER__PORT": "9100", "LRPILOT_STORAGE__STATE_DIR": "/tmp/x", "LRPILOT_AUTH_TOKEN": "s3cret-admin"}
    config = load_config(path, environ=env)
    assert config.server.port == 9100
    assert config.storage.state_dir == Path("/tmp/x")
    assert [(t.role, t.token) for t in config.all_tokens()] == [("admin", "s3cret-admin")]


def test_bad_environment_value_is_named(tmp_path: Path) -> None:
    """A wrong type coming from the environment names the field too."""
    with pytest.raises(ConfigError, match=r"server\.port"):
        load_config(None, environ={"LRPILOT_SERVER__PORT": "lots"})


def test_job_rules_match_by_glob_and_labels_first_match_wins(tmp_path: Path) -> None:
    """Rules pick a job's policy by name glob and labels; detectors merge over the defaults."""
    path = tmp_path / "config.yaml"
    path.write_text(
        """
jobs:
  - match: {name: "bert-*", labels: {team: nlp}}
    policy: {kind: one_cycle, max_lr: 0.001, total_steps: 100}
    detectors: {oscillation: false, plateau: {patience: 3}}
  - match: {name: "bert-*"}
    policy: {kind: constant}
"""
    )
    config = load_config(path, environ={})
    nlp = config.job_spec_for("bert-base", {"team": "nlp"})
    assert nlp.policy.kind == "one_cycle"
    assert {d.name for d in nlp.detectors} == {
        "non_finite",
        "spike",
        "divergence",
        "overshoot",
        "plateau",
        "slow_progress",
        "stalled",
    }
    assert config.job_spec_for("bert-large", {"team": "cv"}).policy.kind == "constant"
    assert config.job_spec_for("resnet", {}).policy.kind == "reduce_on_plateau"


def test_jobs_of_one_rule_share_one_spec_and_a_copy_or_request_gets_its_own() -> None:
    """The spec of a rule is built once per config; a request, another rule or a changed copy
    of the config (model_copy shares the private cache dict) never gets a stale one."""
    config = Config.model_validate(
        {"jobs": [{"match": {"name": "bert-*"}, "policy": {"kind": "constant"}}]}
    )
    first = config.job_spec_for("bert-base", {})
    assert config.job_spec_for("bert-large", {}) is first
    default = config.job_spec_for("resnet", {})
    assert default is not first and default.policy.kind == "reduce_on_plateau"
    assert config.job_spec_for("vit", {}) is default
    requested = config.job_spec_for("bert-x", {}, {"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01})
    assert requested.policy.kind == "cyclic"
    assert config.job_spec_for("bert-y", {}) is first
    changed = config.model_copy(update={"jobs": []})
    assert changed.job_spec_for("bert-base", {}).policy.kind == "reduce_on_plateau"
    assert config.job_spec_for("bert-base", {}).policy.kind == "constant"


def test_a_job_may_request_its_policy_and_a_bad_request_is_named() -> None:
    """A policy requested in hello is used; an invalid one is refused naming hello.policy."""
    config = load_config(None, environ={})
    spec = config.job_spec_for("j", {}, {"kind": "cyclic", "base_lr": 0.001, "max_lr": 0.01})
    assert spec.policy.kind == "cyclic"
    with pytest.raises(ConfigError, match=r"hello\.policy\.factor"):
        config.job_spec_for("j", {}, {"kind": "reduce_on_plateau", "factor": 3})


def test_token_file_lines_are_parsed_and_errors_give_the_line(tmp_path: Path) -> None:
    """A token file gives tokens with roles and globs; a bad line is named by number."""
    tokens = tmp_path / "tokens"
    tokens.write_text("# comment\njob:bert-*,gpt-*:job-token-123\nadmin:*:admin-token-456\n")
    path = tmp_path / "config.yaml"
    path.write_text(f"auth:\n  token_file: {tokens}\n")
    config = load_config(path, environ={})
    assert [(t.role, t.jobs) for t in config.all_tokens()] == [("job", ["bert-*", "gpt-*"]), ("admin", ["*"])]
    tokens.write_text("job:bert-*:ok-token-123\nroot:*:nope-nope\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_config(path, environ={})

"""docs/configuration.md is generated from the models, and is current."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from monitor import configdoc
from monitor.config import Config, load_config
from monitor.engine.registry import DETECTOR_NAMES, POLICY_KINDS, detector_classes, policy_classes


def test_committed_reference_is_current() -> None:
    committed = configdoc.DOC_PATH.read_text(encoding="utf-8")
    assert committed == configdoc.render(), "docs/configuration.md is stale: run python -m monitor.configdoc --write"


def test_every_config_key_is_documented_with_its_environment_variable() -> None:
    text = configdoc.render()
    for section, info in Config.model_fields.items():
        if section == "jobs":
            continue
        model = info.annotation
        assert isinstance(model, type)
        assert f"## `{section}`" in text
        for key in model.model_fields:  # type: ignore[attr-defined]
            env = f"LRPILOT_{section.upper()}__{key.upper()}"
            assert f"| `{key}` |" in text and f"`{env}`" in text, f"{section}.{key} missing"


@pytest.mark.parametrize(
    ("environ", "attribute", "expected"),
    [
        ({"LRPILOT_SERVER__PORT": "9000"}, ("server", "port"), 9000),
        ({"LRPILOT_EXPORTER__ENABLED": "false"}, ("exporter", "enabled"), False),
        ({"LRPILOT_WATCH__DIRS": "[/runs, /more]"}, ("watch", "dirs"), [Path("/runs"), Path("/more")]),
        ({"LRPILOT_LIMITS__MAX_JOBS": "7"}, ("limits", "max_jobs"), 7),
    ],
)
def test_documented_environment_variables_do_what_the_reference_says(
    environ: dict[str, str], attribute: tuple[str, str], expected: object
) -> None:
    config = load_config(None, environ=environ)
    assert getattr(getattr(config, attribute[0]), attribute[1]) == expected


def test_every_policy_and_detector_parameter_is_documented() -> None:
    text = configdoc.render()
    for kind in POLICY_KINDS:
        assert f"### `kind: {kind}`" in text
        params, _ = policy_classes(kind)
        for field in dataclasses.fields(params):
            assert f"| `{field.name}` |" in text
    for name in DETECTOR_NAMES:
        assert f"### `{name}`" in text
        params, _ = detector_classes(name)
        for field in dataclasses.fields(params):
            assert f"| `{field.name}` |" in text


def test_defaults_shown_are_the_models_defaults() -> None:
    text = configdoc.render()
    defaults = Config()
    assert f"| `port` | int | `{defaults.server.port}` |" in text
    assert f"| `max_frame_bytes` | int | `{defaults.server.max_frame_bytes}` |" in text
    assert "| `z_threshold` | float | `6.0` |" in text


def test_check_reports_a_stale_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    doc = tmp_path / "configuration.md"
    doc.write_text("# an old reference\n", encoding="utf-8")
    monkeypatch.setattr(configdoc, "DOC_PATH", doc)
    assert configdoc.main(["--check"]) == 1
    assert "stale" in capsys.readouterr().err
    assert configdoc.main(["--write"]) == 0
    assert configdoc.main(["--check"]) == 0
    assert doc.read_text(encoding="utf-8") == configdoc.render()

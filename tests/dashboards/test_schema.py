"""Dashboards type-check against Grafana's own schema (@grafana/schema) and are well formed.

The type check writes one TypeScript file per dashboard, ``const d: Dashboard = <the JSON>``,
and runs ``tsc --strict --noEmit`` over them: an unknown key, a misspelt option or a value of
the wrong type is a compile error. Prometheus queries and annotations are checked against the
fields Grafana's Prometheus datasource reads (its ``PromQuery``), declared below as extensions
of the schema's ``DataQuery``: the schema itself types queries only as the generic base.

The npm packages are pinned in tests/dashboards/.ts/package.json and installed on first use.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "dashboards").glob("*.json"))
TS_DIR = Path(__file__).resolve().parent / ".ts"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

PRELUDE = """\
import type {
  AnnotationQuery,
  Dashboard,
  DataQuery,
  FieldColorModeId,
  MappingType,
  ThresholdsMode,
} from '@grafana/schema';

/**
 * A JSON string where the schema has a string enum: TypeScript does not let a literal stand for
 * an enum member, so enum values are written as enumValue<E>("value"), which accepts exactly
 * the enum's values.
 */
function enumValue<E extends string>(value: `${E}`): E {
  return value as unknown as E;
}

/** The query fields Grafana's Prometheus datasource reads (its PromQuery type). */
interface PromQuery extends DataQuery {
  expr: string;
  legendFormat?: string;
  interval?: string;
  instant?: boolean;
  range?: boolean;
  exemplar?: boolean;
  format?: 'time_series' | 'table' | 'heatmap';
  editorMode?: 'code' | 'builder';
  intervalFactor?: number;
}

/** Options the Prometheus datasource reads from an annotation besides its query. */
interface PromAnnotation extends AnnotationQuery<PromQuery> {
  titleFormat?: string;
  textFormat?: string;
  tagKeys?: string;
  useValueForTime?: boolean;
}
"""


def load(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


def all_panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Panels, including those nested in rows."""
    out = []
    for panel in dashboard.get("panels", []):
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


#: (parent key, key) -> the schema's string enum for that value
STRING_ENUMS = {
    ("color", "mode"): "FieldColorModeId",
    ("thresholds", "mode"): "ThresholdsMode",
    ("mappings", "type"): "MappingType",
}


def to_typescript(value: Any, parent: str = "", indent: int = 0) -> str:
    """A TypeScript literal for a JSON value, with schema string enums via enumValue<E>()."""
    pad = "  " * (indent + 1)
    if isinstance(value, dict):
        if not value:
            return "{}"
        items = []
        for key, item in value.items():
            enum = STRING_ENUMS.get((parent, key))
            if enum is not None and isinstance(item, str):
                text = f"enumValue<{enum}>({json.dumps(item)})"
            else:
                text = to_typescript(item, key, indent + 1)
            items.append(f"{pad}{json.dumps(key)}: {text}")
        return "{\n" + ",\n".join(items) + "\n" + "  " * indent + "}"
    if isinstance(value, list):
        if not value:
            return "[]"
        # list items keep the list's key as parent, so mappings[i].type is found
        items = [pad + to_typescript(item, parent, indent + 1) for item in value]
        return "[\n" + ",\n".join(items) + "\n" + "  " * indent + "]"
    return json.dumps(value)


def typescript_for(dashboard: dict[str, Any]) -> str:
    """``const d: Dashboard = <literal>`` with annotations and targets typed as Prometheus ones."""
    body = dict(dashboard)
    annotations = body.get("annotations", {}).get("list", [])
    body["annotations"] = "__ANNOTATIONS__"
    targets = [t for p in all_panels(dashboard) for t in p.get("targets", [])]
    literal = to_typescript(body).replace('"__ANNOTATIONS__"', "{ list: annotations }")
    return (
        PRELUDE
        + f"\nconst annotations: PromAnnotation[] = {to_typescript(annotations)};\n"
        + f"\nconst targets: PromQuery[] = {to_typescript(targets)};\n"
        + f"\nconst d: Dashboard = {literal};\n"
        + "\nexport { d, targets };\n"
    )


@pytest.fixture(scope="module")
def tsc_errors(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """Runs tsc once over every dashboard; returns the error lines per dashboard file name."""
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed, so Grafana's schema package cannot be installed")
    if not (TS_DIR / "node_modules" / "@grafana" / "schema").is_dir():
        install = subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"],
            cwd=TS_DIR,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert install.returncode == 0, f"npm ci failed:\n{install.stdout}\n{install.stderr}"
    out_dir = TS_DIR / "generated"
    out_dir.mkdir(exist_ok=True)
    for old in out_dir.glob("*.ts"):
        old.unlink()
    files = []
    for path in DASHBOARDS:
        ts = out_dir / f"{path.stem}.ts"
        ts.write_text(typescript_for(load(path)))
        files.append(ts)
    tsc = TS_DIR / "node_modules" / ".bin" / "tsc"
    result = subprocess.run(
        [
            str(tsc),
            "--strict",
            "--noEmit",
            "--target",
            "es2020",
            "--moduleResolution",
            "node",
            *[str(f) for f in files],
        ],
        cwd=TS_DIR,
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors: dict[str, list[str]] = {path.name: [] for path in DASHBOARDS}
    for line in (result.stdout + result.stderr).splitlines():
        match = re.match(r"generated/([\w.-]+)\.ts", line)
        if match:
            errors[match.group(1) + ".json"].append(line)
        elif line.strip():
            errors.setdefault("<tsc>", []).append(line)
    if result.returncode != 0 and not any(errors.values()):
        errors["<tsc>"] = [f"tsc exited {result.returncode} without errors it could attribute"]
    return errors


def test_there_are_three_dashboards() -> None:
    """The fleet, job and daemon dashboards are all present."""
    assert [p.name for p in DASHBOARDS] == [
        "lrpilot-daemon.json",
        "lrpilot-fleet.json",
        "lrpilot-job.json",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_type_checks_against_grafana_schema(
    path: Path, tsc_errors: dict[str, list[str]]
) -> None:
    """tsc --strict accepts the dashboard as @grafana/schema's Dashboard type."""
    problems = tsc_errors.get(path.name, []) + tsc_errors.get("<tsc>", [])
    assert not problems, "\n".join(problems)


def test_type_check_catches_an_unknown_panel_key() -> None:
    """The generated TypeScript keeps the dashboard a literal, so tsc sees every key."""
    source = typescript_for({"title": "t", "panels": [{"id": 1, "type": "stat", "bogus": 1}]})
    assert '"bogus": 1' in source and "const d: Dashboard = {" in source


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_structure(path: Path) -> None:
    """Unique panel ids, a datasource ref on every panel and target, an expr in every target."""
    dashboard = load(path)
    assert dashboard["schemaVersion"] >= 39
    assert dashboard["uid"] == path.stem
    panels = all_panels(dashboard)
    assert panels
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    for panel in panels:
        where = f"{path.name}: panel {panel['id']} ({panel.get('title')})"
        assert panel.get("datasource") == DATASOURCE, where
        assert panel.get("title"), where
        assert panel.get("description"), where
        targets = panel.get("targets", [])
        assert targets, where
        refs = [t["refId"] for t in targets]
        assert len(refs) == len(set(refs)), f"{where}: duplicate refIds"
        for t in targets:
            assert t.get("datasource") == DATASOURCE, where
            assert isinstance(t.get("expr"), str) and t["expr"].strip(), where
            assert "job=" not in t["expr"].replace("training_job=", ""), (
                f"{where}: use the training_job label, not job"
            )


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_datasource_is_a_template_variable(path: Path) -> None:
    """The data source is the ${datasource} variable of type prometheus, used by every query variable."""
    variables = load(path)["templating"]["list"]
    datasource = [v for v in variables if v["name"] == "datasource"]
    assert len(datasource) == 1
    assert datasource[0]["type"] == "datasource" and datasource[0]["query"] == "prometheus"
    for v in variables:
        if v["type"] == "query":
            assert v["datasource"] == DATASOURCE
    for annotation in load(path)["annotations"]["list"]:
        assert annotation["datasource"] == DATASOURCE
        assert annotation["target"]["expr"].strip()


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_panels_do_not_overlap(path: Path) -> None:
    """No two panels claim the same grid cell, and none sticks out of the 24-column grid."""
    taken: dict[tuple[int, int], int] = {}
    for panel in all_panels(load(path)):
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        for x in range(pos["x"], pos["x"] + pos["w"]):
            for y in range(pos["y"], pos["y"] + pos["h"]):
                assert (x, y) not in taken, f"panels {taken.get((x, y))} and {panel['id']} overlap"
                taken[(x, y)] = panel["id"]

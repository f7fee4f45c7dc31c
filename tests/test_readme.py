"""The README's code, commands and links stay true to the project."""

from __future__ import annotations

import ast
import re
import shlex
from pathlib import Path

import pytest

from monitor.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README, flags=re.S)


def test_python_snippets_are_valid_python() -> None:
    blocks = _blocks("python")
    assert len(blocks) >= 5
    for block in blocks:
        ast.parse(block)


def test_python_snippets_import_what_exists() -> None:
    """Every ``from lrpilot.x import Y`` in the README names a real module attribute."""
    import importlib

    for module, name in re.findall(r"from (lrpilot(?:\.\w+)?) import (\w+)", README):
        assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


def _lrpilot_commands() -> list[list[str]]:
    commands = []
    for block in _blocks("sh"):
        for line in block.splitlines():
            line = line.split("#", 1)[0].strip()
            if line.startswith("lrpilot "):
                commands.append(shlex.split(line)[1:])
    return commands


@pytest.mark.parametrize("argv", _lrpilot_commands(), ids=" ".join)
def test_cli_examples_parse(argv: list[str]) -> None:
    """Each ``lrpilot ...`` line of the README is accepted by the CLI's parser."""
    build_parser().parse_args(argv)


def test_the_two_commands_exist_in_the_makefile_and_ci_runs_the_test_one() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "make demo" in README and "make test" in README
    assert re.search(r"^demo:", makefile, flags=re.M) and re.search(r"^test:", makefile, flags=re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_point_at_files_that_exist(doc: Path) -> None:
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
        if "://" in target or target.startswith("mailto:"):
            continue
        assert (doc.parent / target).exists(), f"{doc.name}: broken link {target}"

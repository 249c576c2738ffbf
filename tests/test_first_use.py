"""What a first-time user meets: README snippets that run as pasted, --help with every default, the demo's notes."""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import torch

from cpia_hf.cli import build_parser
from cpia_hf.dataset.convert import ConvertReport
from cpia_hf.dataset.coverage import count_rows, coverage
from cpia_hf.dataset.catalog import load_catalog
from cpia_hf.demo import cli as demo_cli
from cpia_hf.demo.demo import train_demo_model

ROOT = Path(__file__).parents[1]
README = ROOT / "README.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_is_a_front_page():
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 150
    assert "--repo-id` directly" not in text and "224, 224" not in text
    for target in re.findall(r"\]\(((?:docs/)?[\w./-]+\.md)(?:#[\w-]+)?\)", text):
        assert (ROOT / target).is_file(), target
    docs_index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    for page in (ROOT / "docs").glob("*.md"):
        if page.name != "README.md":
            assert f"]({page.name})" in docs_index, page.name


def test_readme_snippets_run_alone(demo_build: Path, tmp_path: Path, monkeypatch):
    """Each local snippet runs in a fresh namespace against the demo's dataset and a demo model."""
    model = train_demo_model(demo_build / "dataset", tmp_path / "mae-tiny", progress=False)
    local = {"demo_out/dataset": str(demo_build / "dataset"), "demo_out/mae-tiny/model": str(model)}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    ran = 0
    for block in python_blocks(README.read_text(encoding="utf-8")):
        if not any(path in block for path in local):
            continue  # a Hub id the suite cannot reach
        for path, replacement in local.items():
            block = block.replace(f'"{path}"', repr(replacement))
        namespace: dict = {}
        exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102 - the README's own code
        ran += 1
        if "loader" in namespace:  # the transform makes a mixed-size config collatable
            batch = next(iter(namespace["loader"]))
            assert batch["pixel_values"].shape[1:] == (3, 224, 224)
        if "features" in namespace:  # the exported model at its own input size
            assert namespace["size"] == 64 and namespace["features"].shape == (1, 192)
            assert torch.isfinite(namespace["features"]).all()
    assert ran == 3


@pytest.mark.parametrize("command", ["convert", "sources", "demo", "push"])
def test_help_gives_every_option_a_text_and_its_default(command):
    parser = build_parser(command)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    for action in sub._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        assert action.help, action.option_strings
        if not action.required and action.nargs != 0 and command != "push":
            assert "default" in action.help, action.option_strings
    text = sub.format_help()
    assert "%(default)" not in text
    if command == "convert":
        assert re.search(r"--workers WORKERS\s+local worker processes.*\(default: 1\)", " ".join(text.split()))


def demo_coverage(demo_build: Path):
    entries = load_catalog(demo_build / "sources" / "catalog.yaml")
    return coverage(count_rows(demo_build / "dataset" / "data" / "full"), entries)


def test_demo_says_its_coverage_flags_are_expected(demo_build: Path, monkeypatch, capsys):
    rows = demo_coverage(demo_build)
    assert any(row.flags for row in rows)  # the generated data differ from the release
    monkeypatch.setattr(demo_cli, "build_demo", lambda *a, **k: ConvertReport(units=1, coverage=rows))
    args = argparse.Namespace(out=demo_build, workers=1, no_progress=True, convert_only=True)
    assert demo_cli.run_demo(args) == 0
    out = capsys.readouterr().out
    table_at, note_at = out.index("coverage of the release"), out.index("note: the coverage check flags")
    assert table_at < note_at and "as expected" in out[note_at:]
    for row in rows:
        row.flags.clear()
    assert demo_cli.sample_data_note(ConvertReport(coverage=rows)) is None


def test_run_outputs_are_ignored_by_git():
    import subprocess

    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    for path in ("runs/mae-s16/encoder.safetensors", "demo_out/dataset/README.md"):
        assert subprocess.run(["git", "-C", str(ROOT), "check-ignore", "-q", path]).returncode == 0, path

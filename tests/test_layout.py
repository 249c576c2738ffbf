"""The package layout: one folder per stage, imports that flow down the pipeline, no cycle, data files found."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "cpia_hf"
# Stages in pipeline order; a module may import its own stage, the shared top level and earlier stages.
STAGE_ORDER = {"dataset": 1, "model": 1, "train": 2, "evaluate": 2, "demo": 3}
SHARED = 0


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, known: set[str]) -> set[str]:
    """cpia_hf modules imported anywhere in `path` (module level and inside functions)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and target.startswith("cpia_hf"):
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, known) for p in paths}


def stage_rank(module: str) -> int:
    parts = module.split(".")
    return STAGE_ORDER.get(parts[1], SHARED) if len(parts) > 1 and parts[1] in STAGE_ORDER else SHARED


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return trail + [node, nxt]
            if nxt not in state and (cycle := visit(nxt, trail + [node])):
                return cycle
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [])):
            return cycle
    return None


def test_graph_sees_relative_and_absolute_imports() -> None:
    graph = import_graph()
    assert "cpia_hf.model.backbone" in graph["cpia_hf.train.mae"]  # from ..model.backbone import ...
    assert "cpia_hf.dataset.units" in graph["cpia_hf.dataset.convert"]  # from .units import ...
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) is not None  # the checker finds cycles
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle() -> None:
    assert find_cycle(import_graph()) is None


def test_imports_flow_down_the_pipeline() -> None:
    upward = []
    for module, targets in import_graph().items():
        if module == "cpia_hf.cli":  # the entry point loads each stage's cli by name
            continue
        for target in targets:
            same_stage = module.split(".")[:2] == target.split(".")[:2]
            if not same_stage and stage_rank(target) >= max(stage_rank(module), 1) and target != "cpia_hf":
                upward.append(f"{module} -> {target}")
    assert not upward, upward


def test_training_never_imports_export() -> None:
    train_modules = {m: t for m, t in import_graph().items() if m.startswith("cpia_hf.train") and m != "cpia_hf.train.cli"}
    assert not [m for m, targets in train_modules.items() if "cpia_hf.model.export" in targets]


def test_every_stage_has_a_cli_and_no_remapped_packages() -> None:
    for stage in STAGE_ORDER:
        assert (PACKAGE / stage / "cli.py").is_file(), stage
    for folder in ("conversion", "loading_script", "model_cards"):
        assert not (PACKAGE.parent / folder / "__init__.py").exists(), folder
    assert "package_dir" not in (PACKAGE.parent / "setup.cfg").read_text()


@pytest.mark.parametrize("name", ["catalog.yaml", "dataset_card.md.j2", "model_card.md.j2"])
def test_resources_are_the_top_level_files(name: str) -> None:
    from cpia_hf.resources import resource_path

    top_level = {"catalog.yaml": "conversion", "dataset_card.md.j2": "loading_script", "model_card.md.j2": "model_cards"}
    assert resource_path(name).resolve() == (PACKAGE.parent / top_level[name] / name).resolve()


def test_stages_import_from_a_plain_checkout(tmp_path: Path) -> None:
    code = "import cpia_hf.dataset, cpia_hf.model, cpia_hf.train, cpia_hf.evaluate, cpia_hf.demo; print('ok')"
    result = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(PACKAGE.parent)!r}); {code}"],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.stdout.strip() == "ok", result.stderr

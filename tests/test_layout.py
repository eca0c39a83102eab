"""The package's architecture, held by tests: one folder per concern, data flowing one way, no import cycles (module
level or inside functions), no Hydra internals, a model package that needs nothing but torch, an analysis side that
never imports torch, and a README whose layout section matches the tree."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

PACKAGE = REPO / "moe_lab"

# Which concerns each concern may import (besides itself). Data flows one way:
# cli -> training/tools -> data, model, analysis -> errors.
# The leaf modules (errors, files, memory, hub) import only the standard library (memory and hub: errors); the model
# imports none of them.
LEAVES = {"errors", "files", "memory", "hub"}
ALLOWED = {
    "errors": set(),
    "files": set(),
    "memory": {"errors"},
    "hub": {"errors"},
    "model": set(),
    "data": LEAVES,
    "analysis": LEAVES,
    "interop": {"model"} | LEAVES,
    "training": {"model", "data", "analysis", "interop"} | LEAVES,
    "tools": {"training", "model", "data", "analysis", "interop"} | LEAVES,
    "cli": {"training", "tools", "analysis", "data", "model", "interop"} | LEAVES,
    "": {"training"},  # moe_lab/__init__.py: load_model
    "__main__": {"cli"},  # python -m moe_lab
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(path: Path) -> list[str]:
    """Every moe_lab module `path` imports, at module level or inside functions."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:  # `from moe_lab.analysis import figures` imports a module
                candidate = f"{node.module}.{alias.name}"
                out.append(candidate if candidate in MODULES else node.module)
    return [name for name in out if name == "moe_lab" or name.startswith("moe_lab.")]


def third_party_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - {"moe_lab", "__future__"}


def concern(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_the_tree_has_one_folder_per_concern():
    top_level = sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py")
    # Leaf modules every package may use (standard library only): errors, atomic files and digests, memory; and the
    # hub's reachability, which looks in huggingface_hub's cache (imported where it does).
    assert top_level == ["__init__.py", "__main__.py", "errors.py", "files.py", "hub.py", "memory.py"]
    for leaf, library in (("errors", set()), ("files", set()), ("memory", set()), ("hub", {"huggingface_hub"})):
        assert set(imports_of(PACKAGE / f"{leaf}.py")) <= {"moe_lab.errors"}, leaf
        assert third_party_imports(PACKAGE / f"{leaf}.py") <= library, leaf
    folders = sorted(p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__")
    assert folders == ["analysis", "cli", "data", "interop", "model", "tools", "training"]


def test_no_import_cycles():
    graph = {name: {m for m in imports_of(path) if m in MODULES and m != name} for name, path in MODULES.items()}
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for name in sorted(graph):
        if name not in index:
            visit(name)
    assert not cycles, cycles


def test_the_cycle_check_sees_function_local_imports(tmp_path):
    """The check would have caught the old cycles, which hid in function-local imports."""
    source = tmp_path / "x.py"
    source.write_text("def f():\n    from moe_lab.training.train import train\n")
    assert imports_of(source) == ["moe_lab.training.train"]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_data_flows_one_way(name):
    own = concern(name)
    for imported in imports_of(MODULES[name]):
        other = concern(imported)
        assert other == own or other in ALLOWED[own], f"{name} imports {imported}"


def test_the_model_needs_nothing_but_torch():
    for path in (PACKAGE / "model").glob("*.py"):
        assert third_party_imports(path) <= {"torch"}, path.name


def test_no_hydra_internals():
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [alias.name for alias in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.startswith("hydra._internal") for n in names), path


def test_reading_results_never_imports_torch():
    code = (
        "import sys, moe_lab.analysis.pages, moe_lab.analysis.runs, moe_lab.analysis.stats, moe_lab.errors; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_composing_a_config_never_imports_torch():
    """Shell completion and `--cfg job` compose configs only: the Hydra app, the schemas and the model's settings load
    without torch (a TAB that waited for torch's import took seconds)."""
    code = (
        "import sys, moe_lab.cli.hydra_app, moe_lab.training.schemas, moe_lab.model.config; "
        "from moe_lab.model import ModelConfig, RouterConfig; "
        "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_readme_layout_section_matches_the_tree():
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("## How the code is laid out") :]
    section = section[: section.index("\n## ")]
    block = "".join(re.findall(r"```\n(.*?)```", section, re.S))
    listed = set(re.findall(r"([\w/]+\.py|[\w]+/)", block))
    files = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py"}
    names = {Path(f).name for f in files} | {"__init__.py"}
    for f in files:
        assert Path(f).name in listed or f in listed, f"{f} is not in the README's layout section"
    for item in listed:
        if item.endswith(".py"):
            assert item in names or item in files, f"the README lists {item}, which does not exist"
    for folder in ("model/", "data/", "training/", "analysis/", "cli/", "tools/", "templates/"):
        assert folder in listed, folder


def test_the_checkers_are_pinned_and_run_where_the_tests_run():
    """ruff and mypy are pinned in the test extra, pre-commit runs the same ruff release, and the README's test
    command (which CI runs) lints, formats and type-checks before the tests."""
    pins = dict(re.findall(r'"(ruff|mypy)==([0-9.]+)"', (REPO / "pyproject.toml").read_text()))
    assert set(pins) == {"ruff", "mypy"}, pins
    precommit = (REPO / ".pre-commit-config.yaml").read_text()
    assert re.search(rf"ruff-pre-commit\n\s+rev: v{re.escape(pins['ruff'])}\b", precommit), precommit
    checks = 'pip install -e ".[test]" && ruff check . && ruff format --check . && mypy'
    command = f"{checks} && python -m pytest -q -n 2 --dist loadfile"
    assert command in (REPO / "README.md").read_text()
    assert command in (REPO / ".ci" / "run").read_text()


def test_the_rooms_stay_small():
    """The MoE math reads at once: experts.py apart from its speed layer, train.py apart from the run's story, the
    bench one module per concern."""
    lines = {str(p.relative_to(PACKAGE)): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert lines["model/experts.py"] < 300 and lines["training/train.py"] < 400, lines
    bench = {name: n for name, n in lines.items() if name.startswith("tools/bench/")}
    assert len(bench) >= 6 and max(bench.values()) < 400, bench

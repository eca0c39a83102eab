"""The Hugging Face families live in one place: one module each in `moe_lab/interop/families/`. No other moe-lab
code names a family, and the help texts and the README list them from the records."""

from __future__ import annotations

import ast
import re
import subprocess
import sys

from moe_lab.interop.families import family, registered, supported, titles

from conftest import REPO


def string_constants(path) -> set[str]:
    return {
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def test_no_code_outside_the_family_records_names_a_family():
    """Every family's model_type as a string anywhere in moe_lab/ but its own module is a second place that knows
    it (a comparison, a list): adding a family would then mean finding them all."""
    names = {f.model_type for f in registered()}
    records = REPO / "moe_lab" / "interop" / "families"
    found = {}
    for path in (REPO / "moe_lab").rglob("*.py"):
        if records in path.parents:
            continue
        named = names & string_constants(path)
        if named:
            found[str(path.relative_to(REPO))] = sorted(named)
    assert not found, found


def test_each_family_is_one_module_and_registers_itself():
    records = REPO / "moe_lab" / "interop" / "families"
    for f in registered():
        module = sys.modules[type(f).__module__]
        assert module.__file__.startswith(str(records)), f.model_type
        assert f.title and f.model_type and family(f.model_type) is f
    moe_families = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "glm4_moe", "gpt_oss", "qwen3_next"]
    assert [f.model_type for f in supported()] == moe_families
    assert [f.model_type for f in supported(moe=False)] == ["llama", "qwen2", "qwen3"]
    assert family("gpt2") is None


def test_help_texts_and_readme_list_the_families_from_their_records():
    for command in ("import", "export", "generate"):
        out = subprocess.run(
            [sys.executable, "-m", "moe_lab", command, "--help"], capture_output=True, text=True, check=True
        ).stdout
        listed = titles(last="or") if command == "export" else titles()
        assert listed in " ".join(out.split()), (command, out)
    readme = (REPO / "README.md").read_text()
    import_section = readme[readme.index("**Import.**") :]
    families_sentence = import_section[import_section.index("Families") :][:600]
    for f in supported():
        assert re.search(rf"\b{re.escape(f.title)}\b", families_sentence), f.title
    for f in supported(moe=False):
        assert f.title in readme, f.title

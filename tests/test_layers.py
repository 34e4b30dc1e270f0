"""The package's layers import downwards only, and the reference oracle stands apart from what it judges."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Lowest first. A module may import its own layer and those below it; data and eval are siblings that do not
# import each other. The leaf helpers import nothing of e2evlp but other leaf helpers.
ORDER = [{"io", "devices", "_ext", "_C", "answers"}, {"kernels"}, {"ops"}, {"nn"}, {"models"}, {"data"}, {"eval"},
         {"train"}, {"commands", "cli", "demo", "demo_config", "demo_picture", "__main__"}]
SIBLINGS = [{"data", "eval"}]
RANK = {part: rank for rank, layer in enumerate(ORDER) for part in layer}
for siblings in SIBLINGS:
    for part in siblings:
        RANK[part] = min(RANK[other] for other in siblings)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[0] == "kernels":  # installed as e2evlp.kernels
        parts.insert(0, "e2evlp")
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_submodule(name: str) -> bool:
    package = ROOT / "e2evlp"
    return name in ("kernels", "_C") or (package / name).is_dir() or (package / f"{name}.py").exists()


def _imports(path: Path):
    """(line, imported module) for every import in the file, inside functions too, relative ones resolved."""
    name = _module_name(path)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            yield node.lineno, module
            if module == "e2evlp":  # `from e2evlp import ops` imports the submodule e2evlp.ops
                yield from ((node.lineno, f"e2evlp.{alias.name}") for alias in node.names if _is_submodule(alias.name))


def _layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[0] == "e2evlp" else None


def _violation(source: str, target: str) -> str | None:
    """Why `source` may not import `target`, or None."""
    here, there = _layer(source), _layer(target)
    if here is None or there is None or here == there:
        return None
    if here == "reference":
        return "the reference oracle imports nothing of e2evlp: it must not share code with what it judges"
    if there == "reference":
        if RANK[here] < RANK["ops"]:
            return "the kernels and leaf helpers do not use the reference"
        if target != "e2evlp.reference":
            return "outside the oracle only its public twins (e2evlp.reference.X) are used, never its helpers"
        return None
    if here not in RANK or there not in RANK:
        return f"{here if here not in RANK else there!r} has no place in the layer order: add it to ORDER"
    if RANK[there] > RANK[here]:
        return f"{here} ({RANK[here]}) imports upwards: {there} ({RANK[there]})"
    if RANK[there] == RANK[here] and any({here, there} <= siblings for siblings in SIBLINGS):
        return f"{here} and {there} are siblings: neither imports the other"
    return None


def _library_files():
    return sorted((ROOT / "e2evlp").rglob("*.py")) + sorted((ROOT / "kernels").rglob("*.py"))


def test_layers_import_downwards_only():
    found = []
    for path in _library_files():
        source = _module_name(path)
        for line, target in _imports(path):
            why = _violation(source, target)
            if why:
                found.append(f"{path.relative_to(ROOT)}:{line} imports {target}: {why}")
    assert not found, "\n".join(found)


@pytest.mark.parametrize("source, target", [
    ("e2evlp.reference.boxes", "e2evlp.ops.boxes"),
    ("e2evlp.ops.attention", "e2evlp.reference.attention"),
    ("e2evlp.eval.evaluate", "e2evlp.train.distributed"),
    ("e2evlp.data.readers_vqa", "e2evlp.eval.metrics"),
    ("e2evlp.eval.metrics", "e2evlp.data.readers"),
    ("e2evlp.kernels.attention_configs", "e2evlp.ops.dispatch"),
    ("e2evlp.devices", "e2evlp.ops"),
    ("e2evlp.models.model", "e2evlp.demo"),
    ("e2evlp.kernels.attention", "e2evlp.reference"),
    ("e2evlp.ops.newthing", "e2evlp.extras"),
])
def test_the_rule_catches_each_kind_of_upward_import(source, target):
    assert _violation(source, target) is not None


@pytest.mark.parametrize("source, target", [
    ("e2evlp.ops.attention", "e2evlp.reference"),  # the reference backend of ops.attention
    ("e2evlp.models.pretraining", "e2evlp.reference"),  # kernels="reference"
    ("e2evlp.ops.attention", "e2evlp.kernels.attention"),
    ("e2evlp.eval.evaluate", "e2evlp.devices"),
    ("e2evlp.cli", "e2evlp.commands"),
    ("e2evlp.reference.matcher", "e2evlp.reference.boxes"),
])
def test_the_rule_allows_downward_imports(source, target):
    assert _violation(source, target) is None


def test_every_library_module_has_a_layer():
    layers = {_layer(_module_name(path)) for path in _library_files()} - {None}
    assert layers <= set(RANK) | {"reference"}, layers - set(RANK)


def test_module_names_follow_the_installed_layout():
    assert _module_name(ROOT / "kernels" / "attention.py") == "e2evlp.kernels.attention"
    assert _module_name(ROOT / "e2evlp" / "ops" / "__init__.py") == "e2evlp.ops"


def test_importing_ops_does_not_import_scipy():
    code = "import sys, e2evlp.ops, e2evlp.nn; print(sorted(m for m in sys.modules if m.split('.')[0] == 'scipy'))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT.parent)
    assert result.stdout.strip() == "[]", result.stdout

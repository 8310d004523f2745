"""The one-way layer rules, checked by scanning every import in the package:
cli -> lifecycle -> train / generate / surgery / quant -> model / data / io -> kernels -> config / names / errors / fs.
Only rwkvctl/cli imports typer/rich; only train/deepspeed_engine.py imports deepspeed."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rwkvctl"

# layer -> rwkvctl subpackages/modules it must never import
FORBIDDEN = {
    "config": {"arch", "model", "kernels", "data", "io", "train", "lifecycle", "cli", "generate", "surgery", "quant"},
    "errors": {"arch", "config", "model", "kernels", "data", "io", "train", "lifecycle", "cli"},
    # the ground floor: crash-safe file writes, used by every layer that writes
    "fs": {"arch", "config", "model", "kernels", "data", "io", "train", "lifecycle", "cli", "generate", "surgery",
           "quant", "names"},
    # the ground floor too: the one spelling of dtypes and init schemes, and the deprecated aliases
    "names": {"arch", "config", "errors", "fs", "model", "kernels", "data", "io", "train", "lifecycle", "cli",
              "generate", "surgery", "quant"},
    # the architecture registry's torch-free half sits on config: every layer from kernels up may read it
    "arch": {"fs", "model", "kernels", "data", "io", "train", "lifecycle", "cli", "generate", "surgery", "quant"},
    "kernels": {"model", "data", "io", "train", "lifecycle", "cli", "quant"},
    "model": {"data", "io", "train", "lifecycle", "cli", "quant"},
    # quantized checkpoints are read by quant.format on top of io (io reads plain ones)
    "io": {"model", "data", "train", "lifecycle", "cli", "quant"},
    "data": {"model", "train", "lifecycle", "cli", "quant"},
    "train": {"lifecycle", "cli"},
    "generate": {"train", "lifecycle", "cli"},
    "quant": {"train", "lifecycle", "cli", "generate", "data"},
    "surgery": {"train", "lifecycle", "cli", "generate", "quant", "data", "io"},
    "lifecycle": {"cli"},
}


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG)
        layer = rel.parts[0].removesuffix(".py")
        yield path, rel, layer


@pytest.mark.parametrize("path, rel, layer", list(modules()), ids=lambda x: str(x) if isinstance(x, Path) else "")
def test_layer_rules(path, rel, layer):
    for name in imports_of(path):
        top = name.split(".")[0]
        if top in ("typer", "rich"):
            assert layer == "cli", f"{rel} imports {name}: only rwkvctl/cli may use typer/rich"
        if top == "deepspeed":
            assert str(rel) == "train/deepspeed_engine.py", f"{rel} imports deepspeed"
        if top == "rwkvctl" and "." in name:
            target = name.split(".")[1]
            assert target not in FORBIDDEN.get(layer, set()), f"{rel} ({layer}) must not import {name}"


def test_the_quantized_format_has_one_owner():
    """Only rwkvctl/quant/format.py names the quantization metadata key (so only it reads or writes the layout)."""
    owners = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if '"rwkvctl-quant"' in p.read_text()]
    assert owners == ["quant/format.py"]


def _calls_named(path: Path, name: str) -> list[int]:
    """Lines where `name(...)` or `x.name(...)` is called."""
    tree = ast.parse(path.read_text(), filename=str(path))
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and (getattr(node.func, "id", None) == name or getattr(node.func, "attr", None) == name)
    ]


BENCHMARKS = PKG.parent / "benchmarks"


@pytest.mark.parametrize("path", sorted([*PKG.rglob("*.py"), *BENCHMARKS.rglob("*.py")]), ids=str)
def test_models_are_built_through_the_registry(path):
    """Only rwkvctl/model/ constructs RWKV5; everything else calls rwkvctl.model.registry.build_model(cfg), so a new
    architecture needs no change outside the registry."""
    if path.is_relative_to(PKG / "model"):
        return
    lines = _calls_named(path, "RWKV5")
    assert not lines, f"{path.relative_to(PKG.parent)}:{lines[0]} calls RWKV5(...); use build_model(cfg)"


@pytest.mark.parametrize("path", sorted(PKG.rglob("*.py")), ids=str)
def test_architecture_id_is_only_spelled_by_the_registry(path):
    """The id "x052" is written once (rwkvctl/config.py, next to its config class); other modules name an
    architecture through rwkvctl.arch (DEFAULT_ARCH, a config's `architecture`), not by a literal of their own."""
    if path == PKG / "config.py":
        return
    tree = ast.parse(path.read_text(), filename=str(path))
    literals = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value == "x052"]
    assert not literals, f"{path.relative_to(PKG.parent)}:{literals[0]} spells the architecture id 'x052'"


def test_architecture_registry_does_not_import_torch():
    code = "import sys, rwkvctl.arch; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_help_does_not_import_torch():
    code = "import sys; from rwkvctl.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_deprecated_spellings_live_only_in_names():
    """Old dtype/init spellings (rwkvctl.names.DEPRECATED) appear as string literals nowhere else in the package:
    commands translate them through rwkvctl.names, so the alias table has one home."""
    from rwkvctl.names import DEPRECATED

    old = {name for table in DEPRECATED.values() for name in table}
    for path, rel, _ in modules():
        if str(rel) == "names.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                assert node.value not in old, f"{rel}:{node.lineno} spells {node.value!r}; use rwkvctl.names"

"""The one-way layer rules of code-style.md, checked by scanning every import in the package."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rwkvctl"

# layer -> rwkvctl subpackages/modules it must never import
FORBIDDEN = {
    "config": {"model", "kernels", "data", "io", "train", "lifecycle", "cli", "generate", "surgery", "quant"},
    "errors": {"config", "model", "kernels", "data", "io", "train", "lifecycle", "cli"},
    # the ground floor: crash-safe file writes, used by every layer that writes
    "fs": {"config", "model", "kernels", "data", "io", "train", "lifecycle", "cli", "generate", "surgery", "quant"},
    "kernels": {"model", "data", "io", "train", "lifecycle", "cli"},
    "model": {"data", "io", "train", "lifecycle", "cli"},
    "io": {"model", "data", "train", "lifecycle", "cli"},
    "data": {"model", "train", "lifecycle", "cli"},
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


def test_help_does_not_import_torch():
    code = "import sys; from rwkvctl.cli import app; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --- One owner for the run-directory layout: only rwkvctl/train/run_dir.py spells its names. ---

RUN_DIR_MODULE = Path("train/run_dir.py")
# A layout name, matched against each "/"-separated part of a string that has no whitespace: paths and glob patterns
# have none, while prose (help text, messages) that mentions a file by name does. In an f-string `{}` stands for
# each interpolated value; a regular expression's leading `^` is ignored.
LAYOUT_PART = re.compile(
    r"^(run_config\.yaml|metrics(\.superseded)?\.jsonl|wandb_id\.txt|branch\.json|checkpoints|trainer_state\.json"
    r"|engine_state\.pt)$"
    r"|^step-|^\.(tmp|old|deleting|write-test)-|^superseded-|^rng-rank|^rwkv-.*\.pth$"
)
# Layout names that are ordinary words elsewhere (the strategy "deepspeed", a dict key "state"): flagged only where
# they name a path, as an operand of `/` or an argument of joinpath/glob/os.path.join.
JOIN_ONLY = {"deepspeed", "state"}
_JOIN_CALLS = {"joinpath", "glob", "rglob", "join"}


def _template(node: ast.AST) -> str | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
    return None


def layout_strings(source: str) -> list[tuple[int, str]]:
    """(line, string) of every string in `source` that spells a part of the run-directory layout."""
    tree = ast.parse(source)
    skip = set()  # docstrings and the literal pieces of f-strings (their whole template is checked instead)
    for node in ast.walk(tree):
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
            skip.add(id(node.value))
        if isinstance(node, ast.JoinedStr):
            skip.update(id(v) for v in node.values)
    found = []
    for node in ast.walk(tree):
        text = None if id(node) in skip else _template(node)
        is_path = text is not None and not any(c.isspace() for c in text)
        if is_path and any(LAYOUT_PART.search(p.lstrip("^")) for p in text.split("/")):
            found.append((node.lineno, text))
        joined: list[ast.AST] = []
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            joined = [node.left, node.right]
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _JOIN_CALLS:
            joined = list(node.args)
        for operand in joined:
            part = _template(operand)
            if part is not None and any(p in JOIN_ONLY for p in part.split("/")):
                found.append((operand.lineno, part))
    return found


def test_only_the_run_dir_module_spells_the_run_layout():
    offenders = [f"{rel}:{line}: {text!r}" for path, rel, _ in modules() if rel != RUN_DIR_MODULE
                 for line, text in layout_strings(path.read_text())]
    assert not offenders, "run-directory paths are built in rwkvctl/train/run_dir.py only (RunDir/CheckpointDir):\n" \
        + "\n".join(offenders)


def test_the_layout_scan_sees_every_name_of_the_run_dir_module():
    # Not vacuous: the names the run-dir module really spells are exactly what the scan looks for.
    spelled = {text for _, text in layout_strings((PKG / RUN_DIR_MODULE).read_text())}
    for name in ("run_config.yaml", "metrics.jsonl", "metrics.superseded.jsonl", "wandb_id.txt", "branch.json",
                 "checkpoints", "trainer_state.json", "engine_state.pt", "deepspeed", "rng-rank{}.pt", "rwkv-{}.pth",
                 "step-{}", ".tmp-{}", ".old-{}-{}", ".deleting-{}-{}", ".deleting-*", "superseded-{}-{}"):
        assert name in spelled, name


@pytest.mark.parametrize("code", [
    'Path(d) / "metrics.jsonl"',
    'd / f"rng-rank{rank}.pt"',
    'ckpt / "deepspeed" / "state"',
    'run.glob("checkpoints/step-*/rwkv-*.pth")',
    'f"{root}/.tmp-step-{step:08d}"',
    'd.joinpath("deepspeed")',
    'os.path.join(d, "engine_state.pt")',
    'NAME = "trainer_state.json"',
    'f"rwkv-{step}.pth"',
    'f"superseded-{d.name}-{stamp}"',
    r're.compile(r"^step-(\d+)$")',
])
def test_the_layout_scan_flags_a_path_built_elsewhere(code):
    assert layout_strings(code)


@pytest.mark.parametrize("code", [
    'def f():\n    """Writes RUN/checkpoints/step-00000200/ and metrics.jsonl."""',
    'typer.Option(help="Run directory: checkpoints, metrics.jsonl, run_config.yaml.")',
    'if strategy == "deepspeed": pass',
    'x = saved["state"]',
    'f"step {n}: non-finite loss"',
    'init = "rwkv-lm"',
    'p / "state.json"',
    'f"{run}: metrics.jsonl has no loss records yet"',
])
def test_the_layout_scan_leaves_prose_and_other_names_alone(code):
    assert not layout_strings(code)

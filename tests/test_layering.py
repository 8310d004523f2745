"""The one-way layer rules, checked by scanning every import in the package:
cli -> serve -> lifecycle -> train / generate / surgery / quant -> model / data / io -> kernels -> config / names /
errors / fs. Only rwkvctl/cli imports typer/rich; only rwkvctl/serve imports fastapi/uvicorn/starlette; only
train/deepspeed_engine.py imports deepspeed."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "rwkvctl"

# layer -> rwkvctl subpackages/modules it must never import
FORBIDDEN = {
    "config": {"arch", "model", "kernels", "data", "io", "train", "lifecycle", "cli", "serve", "generate", "surgery",
               "quant"},
    "errors": {"arch", "config", "model", "kernels", "data", "io", "train", "lifecycle", "cli", "serve"},
    # the ground floor: crash-safe file writes, used by every layer that writes
    "fs": {"arch", "config", "model", "kernels", "data", "io", "train", "lifecycle", "cli", "serve", "generate",
           "surgery", "quant", "names"},
    # the ground floor of the compiled parts (cache root, RWKVCTL_* build settings, build lock), below kernels and data
    "native_build": {"arch", "config", "fs", "names", "model", "kernels", "data", "io", "train", "lifecycle", "cli",
                     "serve", "generate", "surgery", "quant"},
    # the ground floor too: one writer per output directory (flock), used by every command that writes one
    "dir_lock": {"arch", "config", "fs", "names", "native_build", "model", "kernels", "data", "io", "train",
                 "lifecycle", "cli", "serve", "generate", "surgery", "quant"},
    # the ground floor too: the one spelling of dtypes and init schemes, and the deprecated aliases
    "names": {"arch", "config", "errors", "fs", "model", "kernels", "data", "io", "train", "lifecycle", "cli",
              "serve", "generate", "surgery", "quant"},
    # the architecture registry's torch-free half sits on config: every layer from kernels up may read it
    "arch": {"fs", "model", "kernels", "data", "io", "train", "lifecycle", "cli", "serve", "generate", "surgery",
             "quant"},
    "kernels": {"model", "data", "io", "train", "lifecycle", "cli", "serve", "quant"},
    "model": {"data", "io", "train", "lifecycle", "cli", "serve", "quant"},
    # quantized checkpoints are read by quant.format on top of io (io reads plain ones)
    "io": {"model", "data", "train", "lifecycle", "cli", "serve", "quant"},
    "data": {"model", "train", "lifecycle", "cli", "serve", "quant"},
    "train": {"lifecycle", "cli", "serve"},
    "generate": {"train", "lifecycle", "cli", "serve"},
    "quant": {"train", "lifecycle", "cli", "serve", "generate", "data"},
    "surgery": {"train", "lifecycle", "cli", "serve", "generate", "quant", "data", "io"},
    "lifecycle": {"cli", "serve"},
    # the HTTP front end (OpenAI API over the inference engine): above lifecycle, below the command line
    "serve": {"cli"},
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


# The top: the command line and the package entry points may import anything below them.
TOP = {"cli", "__init__", "__main__"}


def test_every_module_has_a_layer():
    """A new top-level module or package must be placed in FORBIDDEN (or be part of the top), so no module escapes
    the layer rules by being unlisted."""
    unplaced = sorted({layer for _, _, layer in modules()} - set(FORBIDDEN) - TOP)
    assert not unplaced, f"give these a row in FORBIDDEN: {unplaced}"


def test_readme_layout_lists_exactly_the_layers():
    """README's Layout section names every top-level module/package of rwkvctl/, and nothing that is not there."""
    readme = (PKG.parent / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```")[1]
    listed = {line.split()[0].removeprefix("rwkvctl/").rstrip("/").removesuffix(".py")
              for line in block.strip().splitlines() if line.startswith("rwkvctl/")}
    present = {layer for _, _, layer in modules()} - {"__init__", "__main__"}
    assert listed == present, f"README Layout lists {sorted(listed - present)}, misses {sorted(present - listed)}"


@pytest.mark.parametrize("path, rel, layer", list(modules()), ids=lambda x: str(x) if isinstance(x, Path) else "")
def test_layer_rules(path, rel, layer):
    for name in imports_of(path):
        top = name.split(".")[0]
        if top in ("typer", "rich"):
            assert layer == "cli", f"{rel} imports {name}: only rwkvctl/cli may use typer/rich"
        if top in ("fastapi", "uvicorn", "starlette"):
            assert layer == "serve", f"{rel} imports {name}: only rwkvctl/serve may use the HTTP stack"
        if top == "lm_eval":
            assert str(rel) in ("lifecycle/harness.py", "cli/lm_eval_cmd.py"), f"{rel} imports lm_eval"
        if top == "deepspeed":
            assert str(rel) == "train/deepspeed_engine.py", f"{rel} imports deepspeed"
        if top == "rwkvctl" and "." in name:
            target = name.split(".")[1]
            assert target not in FORBIDDEN.get(layer, set()), f"{rel} ({layer}) must not import {name}"


def test_the_quantized_format_has_one_owner():
    """Only rwkvctl/quant/format.py names the quantization metadata key (so only it reads or writes the layout)."""
    owners = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if '"rwkvctl-quant"' in p.read_text()]
    assert owners == ["quant/format.py"]


def test_the_zero_mapping_has_one_owner():
    """Only rwkvctl/train/zero_layout.py names the keys of DeepSpeed's ZeRO mapping (so every read of it goes through
    its type and bounds checks)."""
    for key in ('"param_shapes"', '"param_slice_mappings"', '"single_partition_of_fp32_groups"'):
        owners = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if key in p.read_text()]
        assert owners == ["train/zero_layout.py"], key


def test_format_versions_are_checked_in_one_place():
    """Every reader of a versioned format refuses a newer file through rwkvctl.io.bounded_json.format_version (one
    wording, one rule for absent versions), never with its own comparison."""
    owners = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if "by a newer rwkvctl" in p.read_text()]
    assert owners == ["io/bounded_json.py"]


@pytest.mark.parametrize("rel", ["quant/search.py", "quant/gptq.py"])
def test_the_rounding_cores_are_pure_tensor_code(rel):
    """The range search and GPTQ error feedback take tensors and give tensors: they import nothing of rwkvctl but
    its errors and each other (no model, file or calibration run), so each is tested on plain matrices."""
    allowed = {"rwkvctl.errors", "rwkvctl.quant.search"}
    used = {name for name in imports_of(PKG / rel) if name.startswith("rwkvctl")}
    assert used <= allowed, f"{rel} imports {sorted(used - allowed)}"


def test_the_packed_matmul_op_has_one_owner():
    """Only rwkvctl/kernels/qmm.py calls `rwkvctl::group_affine_mm` (so only it knows the kernel's tile layout); the
    quant layer reaches the kernel through it."""
    owners = [str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if "group_affine_mm(" in p.read_text()]
    assert owners == ["kernels/qmm.py"]


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


# --- what reaches the terminal -------------------------------------------------------------------------------------
# Text from files, the model and data is cleaned of control characters before it is printed (cli/terminal.py):
# values go into markup through `shown()` (clean, then escape), never Rich's bare `escape`, and every print goes
# through the consoles of cli/_common.py, which clean what they render.
def terminal_rule_breaks(source: str) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.ImportFrom) and node.module == "rich.markup":
            found += [f"line {line}: from rich.markup import {a.name} (use cli.terminal.shown)" for a in node.names]
        elif isinstance(node, ast.Import) and any(a.name == "rich.markup" for a in node.names):
            found.append(f"line {line}: import rich.markup (use cli.terminal.shown)")
        elif isinstance(node, ast.Call) and "Console" in (getattr(node.func, "id", ""), getattr(node.func, "attr", "")):
            found.append(f"line {line}: Console(...) (print with cli._common.console / err_console)")
    return found


def test_terminal_rule_check_sees_every_form():
    for code in ("from rich.markup import escape", "import rich.markup", "from rich.console import Console\nConsole()",
                 "import rich.console\nrich.console.Console(stderr=True)"):
        assert terminal_rule_breaks(code), code
    assert not terminal_rule_breaks("from rwkvctl.cli.terminal import shown\nconsole.print(shown(x))")


@pytest.mark.parametrize("path", sorted((PKG / "cli").glob("*.py")), ids=lambda p: p.name)
def test_cli_prints_only_cleaned_text(path):
    if path.name in ("terminal.py", "_common.py"):  # the sanitizer, and the consoles that apply it
        return
    breaks = terminal_rule_breaks(path.read_text())
    assert not breaks, f"cli/{path.name}: {breaks}"


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


# --- only rwkvctl/fs.py writes temp files ------------------------------------------------------------------------
# Temp names, fsync, rename and stale-temp removal are the crash-safety protocol: one copy of it, in fs.py.
FS_ONLY = {("os", "replace"), ("os", "rename"), ("os", "renames"), ("os", "fsync"), ("os", "fdatasync"),
           ("os", "link"), ("shutil", "move")}  # fmt: skip


def temp_file_writes(source: str) -> list[str]:
    """Every place in `source` that does the crash-safe write protocol by hand (what only fs.py may do)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "tempfile" or (alias.name in ("os", "shutil") and alias.asname):
                    found.append(f"line {line}: import {alias.name}{' as ' + alias.asname if alias.asname else ''}")
        elif isinstance(node, ast.ImportFrom) and node.module in ("os", "shutil", "tempfile"):
            for alias in node.names:
                if node.module == "tempfile" or (node.module, alias.name) in FS_ONLY:
                    found.append(f"line {line}: from {node.module} import {alias.name}")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and ((node.value.id, node.attr) in FS_ONLY or node.value.id == "tempfile")
        ):
            found.append(f"line {line}: {node.value.id}.{node.attr}")
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            # Path.rename/replace take one positional argument (str.replace two or three, fs.rename two)
            if node.func.attr in ("rename", "replace") and len(node.args) == 1 and not node.keywords:
                found.append(f"line {line}: .{node.func.attr}(...) (a Path rename)")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and ".tmp" in node.value:
            found.append(f"line {line}: string {node.value[:40]!r} (a temp name)")
    return found


def test_temp_file_check_sees_every_form():
    bad = [
        "import os\nos.replace(a, b)", "import os\nos.fsync(f.fileno())", "from os import rename",
        "import tempfile", "from tempfile import mkstemp", "import os as o", "p.rename(q)", "tmp.replace(final)",
        "import shutil\nshutil.move(a, b)", "name = f'.{x}.tmp-{pid}'", "d / '.tmp-step'",
    ]  # fmt: skip
    for snippet in bad:
        assert temp_file_writes(snippet), snippet
    fine = ["s.replace('a', 'b')", "dataclasses.replace(cfg, gate=True)", "d.replace(year=1)", "os.unlink(p)",
            "fs.rename(a, b)"]  # fmt: skip
    for snippet in fine:
        assert not temp_file_writes(snippet), snippet
    # and on the real module that does all of it
    assert len(temp_file_writes((PKG / "fs.py").read_text())) >= 5


@pytest.mark.parametrize("path, rel, layer", list(modules()), ids=lambda x: str(x) if isinstance(x, Path) else "")
def test_only_fs_writes_temp_files(path, rel, layer):
    if str(rel) == "fs.py":
        return
    found = temp_file_writes(path.read_text())
    assert not found, f"{rel} writes temp files by hand ({'; '.join(found)}); use rwkvctl.fs"


# --- only rwkvctl/native_build.py knows the build cache root, the compiler variable and the build lock -----------
BUILD_ONLY_NAMES = {"CXX", "RWKVCTL_CACHE_DIR", "RWKVCTL_EXTENSIONS_DIR", "RWKVCTL_NO_NATIVE",
                    "RWKVCTL_SKIP_CUDA_BUILD"}  # fmt: skip


def build_settings_read(source: str) -> list[str]:
    """Places in `source` that read a build setting or take a file lock themselves (what only native_build may)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and node.value in BUILD_ONLY_NAMES:
            found.append(f"line {node.lineno}: {node.value!r}")
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"line {node.lineno}: imports {n}" for n in names if n.split(".")[0] == "fcntl"]
    return found


def test_build_settings_check_sees_them():
    assert build_settings_read("os.environ.get('CXX', 'g++')") and build_settings_read("import fcntl")
    assert build_settings_read("from fcntl import flock") and not build_settings_read("'RWKVCTL_WKV'")
    assert len(build_settings_read((PKG / "native_build.py").read_text())) >= 5


# The two owners of file locks: native_build (the build lock) and dir_lock (one writer per output directory).
LOCK_OWNERS = {"native_build.py", "dir_lock.py"}


@pytest.mark.parametrize("path, rel, layer", list(modules()), ids=lambda x: str(x) if isinstance(x, Path) else "")
def test_only_native_build_reads_build_settings(path, rel, layer):
    if str(rel) == "native_build.py":
        return
    found = build_settings_read(path.read_text())
    if str(rel) in LOCK_OWNERS:  # dir_lock may lock, but reads no build setting
        found = [f for f in found if not f.endswith("imports fcntl")]
    assert not found, f"{rel} reads build settings or locks by itself ({'; '.join(found)}); use rwkvctl.native_build" \
        " or rwkvctl.dir_lock"


def test_the_lock_allowance_is_needed():
    # not vacuous: dir_lock really imports fcntl, and that is all the scan finds in it
    found = build_settings_read((PKG / "dir_lock.py").read_text())
    assert found and all(f.endswith("imports fcntl") for f in found)


@pytest.mark.parametrize("path, rel, layer", list(modules()), ids=lambda x: str(x) if isinstance(x, Path) else "")
def test_only_dir_lock_names_lock_files(path, rel, layer):
    """The writer-lock file names (`.rwkvctl.lock`, `.rwkvctl-PART.lock`) are spelled in rwkvctl/dir_lock.py only;
    code that must tell them apart from real content calls `dir_lock.is_lock_file`."""
    if str(rel) == "dir_lock.py":
        return
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith(".rwkvctl"):
            raise AssertionError(f"{rel}:{node.lineno} spells a lock-file name {node.value!r}; use rwkvctl.dir_lock")


# --- One owner for the run-directory layout: only rwkvctl/train/run_dir.py spells its names. ---
# (Temp, replaced and half-deleted directories are named by rwkvctl/fs.py: the crash-safety protocol, checked above.)

RUN_DIR_MODULE = Path("train/run_dir.py")
# A layout name, matched against each "/"-separated part of a string that has no whitespace: paths and glob patterns
# have none, while prose (help text, messages) that mentions a file by name does. In an f-string `{}` stands for
# each interpolated value; a regular expression's leading `^` is ignored.
LAYOUT_PART = re.compile(
    r"^(run_config\.yaml|metrics(\.superseded)?\.jsonl|wandb_id\.txt|branch\.json|checkpoints|trainer_state\.json"
    r"|engine_state\.pt)$"
    r"|^step-|^\.write-test-|^superseded-|^rng-rank|^rwkv-.*\.pth$"
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
                 "step-{}", "superseded-{}-{}"):
        assert name in spelled, name


@pytest.mark.parametrize("code", [
    'Path(d) / "metrics.jsonl"',
    'd / f"rng-rank{rank}.pt"',
    'ckpt / "deepspeed" / "state"',
    'run.glob("checkpoints/step-*/rwkv-*.pth")',
    'f"{root}/step-{step:08d}"',
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


def test_front_ends_decode_only_through_the_engine():
    """Chat, generate and any other front end decode through generate/engine.py: none samples, tracks penalties,
    streams or cuts stop texts itself (one decode loop, one place for stop rules)."""
    owned = {"sample", "PenaltyTracker", "TextStream", "StopTexts"}
    offenders = []
    for path, rel, layer in modules():
        if layer == "generate":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rwkvctl.generate"):
                offenders += [f"{rel}: imports {a.name}" for a in node.names if a.name in owned]
    assert not offenders, offenders


def test_only_host_memory_talks_to_the_c_allocator():
    """Giving freed heap back to the OS (glibc malloc_trim) is platform code with one home:
    rwkvctl/train/host_memory.py; everything else calls release_free_host_memory()."""
    users = sorted(str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if "malloc_trim" in p.read_text())
    assert users == ["train/host_memory.py"], users


# The fast CPU step has one switchboard: only rwkvctl/model/cpu_fast.py calls its compiled ops (and decides when the
# module path, their reference, runs instead), so RWKVCTL_STEP and the fallback notice cover every use.
STEP_OPS = ("rnn_step_layer", "linear_f32acc")


@pytest.mark.parametrize("path, rel, layer", list(modules()), ids=lambda x: str(x) if isinstance(x, Path) else "")
def test_only_cpu_fast_calls_the_step_ops(path, rel, layer):
    if str(rel) == "model/cpu_fast.py":
        assert all(_calls_named(path, op) for op in STEP_OPS)
        return
    lines = [line for op in STEP_OPS for line in _calls_named(path, op)]
    assert not lines, f"{rel}:{lines[0]} calls a compiled step op; go through rwkvctl.model.cpu_fast"

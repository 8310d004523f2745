"""rwkvctl.names: the one spelling of dtypes and init schemes, and the deprecated spellings it still accepts."""

import pytest

from rwkvctl.config import INIT_SCHEMES as CONFIG_INIT_SCHEMES
from rwkvctl.names import DEPRECATED, DTYPE_NAMES, INIT_SCHEMES, Spelling, canonical, dtype_name
from rwkvctl.surgery import GATE_INITS


def test_every_old_spelling_maps_to_a_current_one():
    current = {"dtype": set(DTYPE_NAMES), "init": set(INIT_SCHEMES)}
    for kind, table in DEPRECATED.items():
        assert set(table.values()) <= current[kind], kind
        assert not set(table) & current[kind], f"{kind}: a spelling cannot be both current and deprecated"


def test_init_schemes_have_one_home():
    assert CONFIG_INIT_SCHEMES is INIT_SCHEMES
    assert set(GATE_INITS) == set(INIT_SCHEMES)  # add-gate offers the schemes `init`/`train` name


@pytest.mark.parametrize(
    "kind, given, expected",
    [("dtype", "bfloat16", Spelling("bf16", "bfloat16")), ("dtype", "float32", Spelling("fp32", "float32")),
     ("dtype", "float16", Spelling("fp16", "float16")), ("init", "rwkv-lm", Spelling("rwkv-lm-2024", "rwkv-lm")),
     ("dtype", "bf16", Spelling("bf16")), ("init", "v5.2-2023", Spelling("v5.2-2023")),
     ("dtype", "int8", Spelling("int8"))],  # unknown values pass through: the caller names its own choices
)
def test_canonical(kind, given, expected):
    assert canonical(kind, given) == expected


def test_notice_only_for_an_old_spelling():
    assert canonical("dtype", "fp32").notice("--dtype") is None
    line = canonical("init", "rwkv-lm").notice("--init")
    assert line is not None and "\n" not in line and "use --init rwkv-lm-2024" in line


@pytest.mark.parametrize("torch_name, short", [("torch.bfloat16", "bf16"), ("float32", "fp32"),
                                               ("torch.float16", "fp16"), ("torch.int8", "int8")])
def test_dtype_name(torch_name, short):
    assert dtype_name(torch_name) == short


def _options():
    import typer.main

    from rwkvctl.cli import app

    def walk(group, prefix):
        for name, command in group.commands.items():
            if hasattr(command, "commands"):
                yield from walk(command, f"{prefix}{name} ")
            else:
                for param in command.params:
                    yield f"{prefix}{name} --{param.name}", param.help or ""

    return dict(walk(typer.main.get_command(app), ""))


def test_help_texts_use_only_the_current_spellings():
    import re

    old = {name for table in DEPRECATED.values() for name in table}
    for option, text in _options().items():
        words = set(re.findall(r"[\w.-]+", text))
        assert not words & old, f"{option} help says {sorted(words & old)}"
    options = _options()
    for option in ("init --init", "add-gate --init"):
        assert all(s in options[option] for s in INIT_SCHEMES), option

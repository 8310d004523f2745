"""The `rwkvctl` command line: the only layer that imports typer and rich.

Each command lives in its own module and registers itself on the shared app when imported. Command
modules import torch and the lifecycle code inside the command body, so `rwkvctl --help` stays fast.
"""

from __future__ import annotations

from rwkvctl.cli import (  # noqa: F401  (registration side effects)
    add_gate,
    chat,
    demo,
    eval_cmd,
    generate_cmd,
    inspect_cmd,
    kernels,
    lm_eval_cmd,
    model_cmds,
    plot,
    prepare,
    quantize,
    serve_cmd,
    tokenizer,
    train,
)
from rwkvctl.cli._common import app

__all__ = ["app"]

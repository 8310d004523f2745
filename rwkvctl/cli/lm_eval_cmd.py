"""`rwkvctl lm-eval ...`: lm-evaluation-harness's own command line with the `rwkvctl` model class registered
(needs `pip install 'rwkvctl[eval]'`)."""

from __future__ import annotations

import sys

import typer

from rwkvctl.cli._common import app, fail, handles_errors


@app.command(
    "lm-eval",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
    add_help_option=False,
)
@handles_errors
def lm_eval_command(ctx: typer.Context) -> None:
    """Run lm-evaluation-harness on an rwkvctl checkpoint: every argument goes to `lm_eval`, e.g.
    `rwkvctl lm-eval --model rwkvctl --model_args path=MODEL.pth,dtype=bf16 --tasks lambada_openai`
    (model_args: path, tokenizer, dtype, device, keep_quantized, chunk_len; --batch_size batches generate_until).
    `rwkvctl lm-eval run --help` shows lm-eval's own options."""
    if not ctx.args or ctx.args in (["--help"], ["-h"]):
        typer.echo(ctx.get_help())
        return
    try:
        import lm_eval.__main__ as harness_cli

        import rwkvctl.lifecycle.harness  # noqa: F401  (registers the `rwkvctl` model class)
    except ImportError as e:
        raise fail(f"lm-eval needs its extra ({e.name} is missing): pip install 'rwkvctl[eval]'") from None
    sys.argv = ["lm_eval", *ctx.args]
    harness_cli.cli_evaluate()

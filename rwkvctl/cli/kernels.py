"""`rwkvctl kernels build|check`: compile the WKV5 extension ahead of time; compare it with the reference."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from rwkvctl.cli._common import app, console, fail, handles_errors, one_spelling

kernels_app = typer.Typer(help="Build and check the compiled WKV5 kernel (C++ CPU, CUDA).", no_args_is_help=True)
app.add_typer(kernels_app, name="kernels")


@kernels_app.command("build")
@handles_errors
def build_cmd(
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show the compiler commands and output.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Delete this build's cache directory and rebuild.")] = False,
) -> None:
    """Compile the WKV5 extension now (otherwise it is compiled on first use) and print where it lives.

    The cache directory is $RWKVCTL_CACHE_DIR/extensions (default ~/.cache/rwkvctl/extensions); the CUDA part is
    built only where torch has CUDA and nvcc is found (RWKVCTL_WKV_SKIP_CUDA=1 skips it).
    """
    import logging
    import time

    from rwkvctl.kernels import build

    if force:
        build.remove_build()
    logging.getLogger("rwkvctl.kernels").setLevel(logging.ERROR)  # this command reports for itself
    with console.status("compiling the WKV5 extension (about a minute the first time)..."):
        start = time.perf_counter()
        info = build.load_extension(verbose=verbose)
        seconds = time.perf_counter() - start
    status = f"built in {seconds:.1f} s" if info.built_now else "already built (cached)"
    console.print(f"[bold]WKV5 extension[/]: {status}, CUDA {'yes' if info.with_cuda else 'no (CPU only)'}")
    # plain lines (not a table) so long paths are never cut and can be copied
    console.print(f"library: {info.library}", soft_wrap=True, highlight=False, markup=False)
    console.print(f"sources: {info.sources}", soft_wrap=True, highlight=False, markup=False)


@kernels_app.command("check")
@handles_errors
def check_cmd(
    device: Annotated[str, typer.Option(help="cpu or cuda.")] = "cpu",
    dtype: Annotated[str, typer.Option(help="Input dtype: fp32 or bf16 (state is always fp32).")] = "fp32",
    reps: Annotated[int, typer.Option(min=1, help="Timed repetitions per shape (median is shown).")] = 3,
    threads: Annotated[int, typer.Option(min=0, help="CPU threads for torch (0 = torch's default).")] = 0,
    quick: Annotated[bool, typer.Option("--quick", help="Only the three short shapes (a few seconds).")] = False,
) -> None:
    """Compare the compiled op with the float64 reference (forward, every gradient) and time fwd+bwd vs
    the chunked PyTorch reference on a few shapes."""
    import torch

    from rwkvctl.errors import KernelUnavailable
    from rwkvctl.kernels import build
    from rwkvctl.kernels.check import DEFAULT_SHAPES, check_shape
    from rwkvctl.kernels.ops import wkv5_compiled

    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    dtype = one_spelling("dtype", dtype, "--dtype")
    if dtype not in dtypes:
        raise fail(f"--dtype must be fp32 or bf16, got {dtype!r}")
    if device not in ("cpu", "cuda"):
        raise fail(f"--device must be cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise KernelUnavailable("--device cuda: torch sees no CUDA GPU here")
    if threads:
        torch.set_num_threads(threads)
    with console.status("loading the WKV5 extension..."):
        info = build.load_extension()
    if device == "cuda" and not info.with_cuda:
        raise KernelUnavailable("the extension was built without CUDA (no nvcc/CUDA_HOME, or RWKVCTL_WKV_SKIP_CUDA)")
    tol = 1e-4 if dtype == "fp32" else 1e-2
    table = Table("B x T x H x N", "fwd err", "bwd err (worst)", "ours fwd+bwd", "chunked ref", "speed-up", "ok")
    failed = 0
    for shape in DEFAULT_SHAPES[:3] if quick else DEFAULT_SHAPES:
        with console.status(f"checking {'x'.join(map(str, shape))}..."):
            row = check_shape(wkv5_compiled, shape, dtypes[dtype], device, reps)
        ok = row.err_forward < tol and row.err_backward < tol
        failed += not ok
        table.add_row(
            "x".join(map(str, row.shape)),
            f"{row.err_forward:.1e}",
            f"{row.err_backward:.1e} ({row.worst_grad})",
            f"{row.seconds_compiled * 1e3:.1f} ms",
            f"{row.seconds_reference * 1e3:.1f} ms",
            f"{row.seconds_reference / row.seconds_compiled:.1f}x",
            "[green]yes[/]" if ok else "[red]NO[/]",
        )
    table.title = f"WKV5 compiled vs reference ({device}, {dtype}, {torch.get_num_threads()} threads)"
    table.caption = f"errors: {row.metric} vs the float64 reference, tolerance {tol:g}"
    console.print(table)
    if failed:
        raise KernelUnavailable(f"{failed} shape(s) above the error tolerance {tol:g}")

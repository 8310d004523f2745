"""Rich rendering for datasets: the prepare progress bar and summary, and `rwkvctl inspect DATA`."""

from __future__ import annotations

from types import TracebackType
from typing import Any

from rich.console import Console
from rich.panel import Panel
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from rwkvctl.cli._common import LogTicker, live_output
from rwkvctl.cli.terminal import shown


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


class PrepareView:
    """Progress bar over input bytes, with files, documents, tokens and text MB/s; feed it `update(progress)`."""

    def __init__(self, console: Console) -> None:
        self.progress = Progress(
            TextColumn("[bold]prepare[/]"),
            BarColumn(bar_width=24),
            TaskProgressColumn(),
            TextColumn("files {task.fields[files]}"),
            TextColumn("docs {task.fields[docs]}"),
            TextColumn("tokens {task.fields[tokens]}"),
            TextColumn("{task.fields[rate]} MB/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
        )
        self._started = False
        self.task = self.progress.add_task("prepare", total=None, files="0/0", docs="0", tokens="0", rate="-")
        self.console = console
        self.live = live_output()
        self.ticker = LogTicker()

    def update(self, p: Any) -> None:
        if not self._started:  # start on the first report, so argument errors print without a bar
            if self.live:
                self.progress.start()
            self._started = True
        rate = f"{p.text_bytes / p.elapsed / 1e6:.1f}" if p.elapsed > 0 else "-"
        if p.in_bytes_total:  # on-disk bytes read: smooth within large files
            total, done = p.in_bytes_total, min(p.in_bytes, p.in_bytes_total)
        else:  # sizes unknown (hub datasets): whole inputs
            total, done = max(p.files_total, 1), p.files_done
        self.progress.update(
            self.task,
            total=total,
            completed=done,
            files=f"{p.files_done}/{p.files_total}",
            docs=_si(p.docs),
            tokens=_si(p.tokens),
            rate=rate,
        )
        if not self.live and self.ticker.due(force=p.files_total > 0 and p.files_done == p.files_total):
            pct = f"{100 * done / total:.0f}%" if total else "-"
            self.console.print(f"prepare {pct} files {p.files_done}/{p.files_total} docs {_si(p.docs)} tokens "
                               f"{_si(p.tokens)} {rate} MB/s elapsed {p.elapsed:.0f}s", markup=False, highlight=False)

    def __enter__(self) -> PrepareView:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._started and self.live:
            self.progress.stop()


def _source_table(title: str, sources: dict[str, dict], docs: int, tokens: int) -> Table:
    t = Table(title=title, title_justify="left")
    for col in ("source", "docs", "tokens", "MB", "tokens/byte"):
        t.add_column(col, justify="left" if col == "source" else "right")
    total_bytes = 0
    for name, c in sources.items():
        total_bytes += c["bytes"]
        tpb = f"{c['tokens'] / c['bytes']:.3f}" if c["bytes"] else "-"
        t.add_row(shown(name), f"{c['docs']:,}", f"{c['tokens']:,}", f"{c['bytes'] / 1e6:,.1f}", tpb)
    tpb = f"{tokens / total_bytes:.3f}" if total_bytes else "-"
    t.add_row("[bold]total[/]", f"{docs:,}", f"{tokens:,}", f"{total_bytes / 1e6:,.1f}", tpb, end_section=True)
    return t


def _bad_table(bad: list[dict]) -> Table:
    t = Table(title="[yellow]bad input (skipped records; roundtrip mismatches are kept)[/]", title_justify="left")
    for col in ("input", "problem", "count", "first line", "detail"):
        t.add_column(col, justify="right" if col in ("count", "first line") else "left", overflow="fold")
    for b in bad:
        detail = shown(b.get("detail", ""))
        t.add_row(shown(b["input"]), shown(b["kind"]), f"{b['count']:,}", str(b["first_line"]), detail)
    return t


def _rwkv_lm_line(console: Console, rl: dict, data: str) -> None:
    if not rl:
        return
    if rl.get("magic_prime") is None:
        console.print(f"[yellow]RWKV-LM: {shown(rl.get('note', 'no magic_prime'))}[/]")
        return
    console.print(
        f"RWKV-LM (after `rwkvctl merge-binidx {shown(data)} OUT`): --ctx_len {rl['ctx_len']} "
        f"--my_exit_tokens {rl['my_exit_tokens']} --magic_prime {rl['magic_prime']}"
    )


def _render_totals(console: Console, splits: dict[str, dict], bad: list[dict]) -> None:
    for split, s in splits.items():
        if s["shards"]:
            title = f"{split}: {s['shards']} shard(s)"
            console.print(_source_table(title, s["sources"], s["docs"], s["tokens"]))
    if bad:
        console.print(_bad_table(bad))


def render_summary(console: Console, result: Any) -> None:
    """End-of-run report for `rwkvctl prepare`."""
    from rwkvctl.data.inspect import describe_dataset

    info = describe_dataset(result.manifest_path, window=0)
    _render_totals(console, info["splits"], info["bad_inputs"])
    stats = result.stats
    rate = stats.text_bytes / result.seconds / 1e6 if result.seconds else 0.0
    console.print(
        f"{result.units_done_now} input(s) tokenized, {result.units_skipped} already done (skipped) in "
        f"{result.seconds:.1f}s ({rate:.1f} MB/s of text this run)"
    )
    enc = result.manifest.encoder
    if enc.get("note"):
        console.print(f"[yellow]encoder: {shown(enc['backend'])} - {shown(enc['note'])}[/]")
    elif enc:
        console.print(f"encoder: {shown(enc['backend'])}")
    if result.complete:
        console.print(f"manifest: [bold]{shown(str(result.manifest_path))}[/]")
    else:
        console.print(
            f"[yellow]partial manifest (this node only): {shown(str(result.manifest_path))}[/]; when every node is "
            "done, rerun the same command without --num-nodes/--node-rank to write manifest.json"
        )
    _rwkv_lm_line(console, result.manifest.rwkv_lm, str(result.manifest_path.parent))


def render_dataset(console: Console, info: dict[str, Any]) -> None:
    """Layout for `rwkvctl inspect DATA` from `rwkvctl.data.inspect.describe_dataset`."""
    head = Table.grid(padding=(0, 2))
    head.add_row("dataset", shown(info["path"]))
    head.add_row("format", shown(f"{info['kind']} ({info['dtype']})"))
    tok = info.get("tokenizer")
    if tok:
        described = f"{tok.get('name')} (vocab {tok.get('vocab_size')}, end-of-doc id {tok.get('eod_id')})"
        head.add_row("tokenizer", shown(described))  # the manifest's fields, shown as text
    if info["kind"] == "binidx":  # no manifest: no per-source counts, just the index totals
        t = info["splits"]["train"]
        head.add_row("sequences / docs", f"{info['sequences']:,} / {t['docs']:,}")
        head.add_row("tokens", f"{t['tokens']:,}")
    if info.get("inputs_done") is not None and info["kind"] == "manifest":
        head.add_row("inputs done", f"{info['inputs_done']:,}")
    console.print(head)
    if info["kind"] == "manifest":
        _render_totals(console, info["splits"], info["bad_inputs"])
    _rwkv_lm_line(console, info.get("rwkv_lm") or {}, info["path"])
    sample = info.get("sample")
    if sample:
        console.print(f"sample window: start of {shown(sample['shard'])}")
        if sample["text"] is not None:
            body = "[dim]<end of doc>[/]\n".join(shown(t) for t in sample["text"])
            title = f"first {len(sample['ids'])} tokens, decoded as {shown(str(sample['decoded_as']))}"
        else:
            body = " ".join(str(i) for i in sample["ids"])
            title = f"first {len(sample['ids'])} token ids"
        console.print(Panel(body, title=title, title_align="left", expand=False))  # logs: not LOG_WIDTH wide

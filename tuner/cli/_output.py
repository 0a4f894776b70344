"""One output helper: the same result as a rich table for people or as JSON for scripts."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from tuner.units import fmt_bytes
from tuner.untrusted import visible

console = Console()
err_console = Console(stderr=True)


def emit(result: dict[str, Any], *, as_json: bool, render: Callable[[Console], None]) -> None:
    """Print ``result`` as one JSON document, or call ``render`` to draw it for a person."""
    if as_json:
        sys.stdout.write(json.dumps(result, indent=2, default=str) + "\n")
        sys.stdout.flush()
    else:
        render(console)


def emit_json_line(obj: dict[str, Any]) -> None:
    """One JSON object on one line (streaming events such as serve's memory_check)."""
    sys.stdout.write(json.dumps(obj, default=str) + "\n")
    sys.stdout.flush()


def warn(line: str) -> None:
    """One warning line on stderr, as the errors are written (``tuner: warning: …``), control characters escaped."""
    sys.stderr.write(f"tuner: warning: {visible(' '.join(line.split()))}\n")
    sys.stderr.flush()


def text(value: object) -> str:
    """A value tuner did not write (a model or file name from a GGUF header or the Hub, a quant label, a reason
    that quotes them) made safe for a rich markup string: brackets escaped, so ``[/bold]x`` prints as itself, and
    control characters shown as ``\\x1b``, so no escape sequence reaches the terminal."""
    return escape(visible(str(value)))


def bytes_cell(n_bytes: int) -> str:
    return fmt_bytes(n_bytes) if n_bytes else "-"


def memory_table(memory: dict[str, Any], title: str = "Memory estimate", *, narrow: bool = False) -> Table:
    """The per-device breakdown of an estimate's ``memory`` object (see MemoryEstimate.to_dict); ``narrow``: in
    about 75 columns (short headers, no box; numbers never wrap, the device names do)."""
    if narrow:
        table = Table(title=title, title_justify="left", box=None, padding=(0, 1), show_edge=False,
                      header_style="bold")
        table.add_column("device", overflow="fold")
    else:
        table = Table(title=title, title_justify="left")
        table.add_column("device")
    vision = any(dev.get("vision_bytes") for dev in memory["devices"])  # a column only when a projector is loaded
    pad = [""] if vision else []
    columns = ("weights", "KV", "state") if narrow else ("weights", "KV cache", "recurrent")
    for col in (*columns, "compute", "output", *(["vision"] if vision else []), "total"):
        table.add_column(col, justify="right", no_wrap=narrow)
    for dev in memory["devices"]:
        table.add_row(text(dev["name"]), bytes_cell(dev["weights_bytes"]), bytes_cell(dev["kv_bytes"]),
                      bytes_cell(dev["recurrent_bytes"]), bytes_cell(dev["compute_bytes"]),
                      bytes_cell(dev["output_bytes"]), *([bytes_cell(dev.get("vision_bytes", 0))] if vision else []),
                      fmt_bytes(dev["total_bytes"]))
    host = memory.get("host", {})
    if host.get("checkpoints_bytes"):
        table.add_row("CPU checkpoints" if narrow else "CPU ctx checkpoints", "", "",
                      bytes_cell(host["checkpoints_bytes"]), "", "", *pad, fmt_bytes(host["checkpoints_bytes"]),
                      style="dim")
    if host.get("prompt_cache_bytes"):
        table.add_row("CPU prompt cache" if narrow else "CPU prompt cache (max)", "", "", "", "", "", *pad,
                      fmt_bytes(host["prompt_cache_bytes"]), style="dim")
    return table


def render_health(out: Console, findings: list[dict[str, Any]]) -> None:
    """``health`` findings (:mod:`tuner.health`): warnings in yellow, notes in cyan, each with its fix, wrapped
    under their first word (a long file name folds rather than widen the line)."""
    if not findings:
        return
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(ratio=1, overflow="fold")
    for f in findings:
        label = "[yellow]warning:[/yellow]" if f["severity"] == "warning" else "[cyan]note:[/cyan]"
        fix = f" [dim](fix: {text(f['fix'])})[/dim]" if f.get("fix") else ""
        grid.add_row(label, f"{text(f['kind'])}: {text(f['message'])}{fix}")
    out.print(grid, highlight=False)

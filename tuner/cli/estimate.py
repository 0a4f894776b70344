"""``tuner estimate``: the memory llama-server will take, per device, for a model and a flag set.

Examples:

    tuner estimate model.gguf --ctx-size 65536 --parallel 1
    tuner estimate Qwen3.5-35B-A3B-Q4_K_M-00001-of-00002.gguf -c 262144 -ctk q8_0 -ctv q8_0 --gpu rtx-4090
    tuner estimate model.gguf --n-cpu-moe 20 --gpu rtx-5080 --json
    tuner estimate model.gguf -c 32768 --check      # beside llama.cpp's own dry run (llama-fit-params)
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tuner.cli import _options as o
from tuner.cli._output import emit, memory_table, text
from tuner.cli.hardware import hardware_dict
from tuner.errors import TunerError
from tuner.estimate import ServerFlags
from tuner.hardware import Hardware, estimate_on, hardware_for
from tuner.layout import ModelLayout
from tuner.models import resolve_layout
from tuner.units import fmt_bytes


def parse_ngl(text: str) -> int | None:
    """``-ngl`` as llama.cpp reads it: a count, or all/auto (every layer)."""
    if text.strip().lower() in ("all", "auto", "-1", "-2"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise TunerError(f"--n-gpu-layers must be a number, 'all' or 'auto', got {text!r}") from None
    if value < 0:
        raise TunerError(f"--n-gpu-layers must not be negative, got {value}")
    return value


def estimate_result(layout: ModelLayout, flags: ServerFlags, hardware: Hardware) -> dict[str, Any]:
    est = estimate_on(layout, flags, hardware)
    result: dict[str, Any] = {"model": layout.source or layout.name, "arch": layout.arch, **est.to_dict()}
    result["flags"] = flags.to_args()
    result["layout"] = layout.to_dict()
    result["hardware"] = hardware_dict(hardware)
    return result


def render_estimate(console: Console, result: dict[str, Any]) -> None:
    ctx = result["context"]
    lay = result["layout"]
    console.print(f"[bold]{text(result['model'])}[/bold]  ({text(result['arch'])}, {lay['n_layer']} layers: "
                  f"{len(lay['attention_layers'])} attention, {len(lay['recurrent_layers'])} recurrent"
                  + (f"; {lay['n_expert']} experts, {lay['n_expert_used']} used" if lay["n_expert"] else "")
                  + (", MTP layer" if lay["has_mtp"] else "") + ")")
    console.print(f"context: n_ctx {ctx['n_ctx']}, per slot {ctx['n_ctx_seq']}, {ctx['n_seq']} slot(s)"
                  f"{' unified' if ctx['kv_unified'] else ''}, flash-attn {'on' if ctx['flash_attn'] else 'off'},"
                  f" ubatch {ctx['n_ubatch']}")
    console.print(memory_table(result["memory"]))
    for gpu in result["hardware"]["gpus"]:
        used = next((d["total_bytes"] for d in result["memory"]["devices"] if d["name"] == gpu["name"]), 0)
        console.print(f"{gpu['name']} ({gpu['model']}): {fmt_bytes(used)} of {fmt_bytes(gpu['vram_total_bytes'])}"
                      f" — add ~0.5-1 GiB of CUDA context and pools that llama.cpp does not count")
    host = result["memory"]["host"]
    console.print(f"host RAM at worst: {fmt_bytes(host['total_bytes'])} "
                  f"(of {fmt_bytes(result['hardware']['ram_available_bytes'])} available)")
    for note in result["notes"] + result["hardware"]["notes"]:
        console.print(f"[yellow]note:[/yellow] {text(note)}")
    check = result.get("check")
    if check:
        table = Table(title=f"llama.cpp's own dry run ({check['tool']})", title_justify="left")
        for col in ("device", "model", "context", "compute"):
            table.add_column(col, justify="right" if col != "device" else "left")
        for row in check["devices"]:
            table.add_row(row["name"], fmt_bytes(row["model_bytes"]), fmt_bytes(row["context_bytes"]),
                          fmt_bytes(row["compute_bytes"]))
        console.print(table)
        for note in check.get("notes", []):
            console.print(f"[dim]{text(note)}[/dim]")


def register(app: typer.Typer) -> None:
    @app.command("estimate")
    def estimate_cmd(
        model: o.ModelArg,
        ctx_size: o.CtxSizeOpt = 0,
        parallel: o.ParallelOpt = -1,
        kv_unified: o.KvUnifiedOpt = None,
        cache_type_k: o.CacheTypeKOpt = "f16",
        cache_type_v: o.CacheTypeVOpt = "f16",
        batch_size: o.BatchOpt = 2048,
        ubatch_size: o.UbatchOpt = 512,
        flash_attn: o.FlashAttnOpt = "auto",
        n_gpu_layers: o.NglOpt = "all",
        n_cpu_moe: o.NCpuMoeOpt = 0,
        cpu_moe: o.CpuMoeOpt = False,
        cache_ram: o.CacheRamOpt = 8192,
        ctx_checkpoints: o.CtxCheckpointsOpt = 32,
        spec_type: o.SpecTypeOpt = None,
        spec_draft_n_max: o.SpecDraftOpt = 3,
        no_kv_offload: o.NoKvOffloadOpt = False,
        gpu: o.GpuOpt = None,
        vram: o.VramOpt = None,
        check: Annotated[bool, typer.Option("--check", help="Also run llama-fit-params' dry run.")] = False,
        server_bin: o.ServerBinOpt = None,
        as_json: o.JsonOpt = False,
    ) -> None:
        """Estimate the memory llama-server takes on each device for MODEL and the given flags."""
        flags = ServerFlags(
            ctx_size=ctx_size, parallel=parallel, kv_unified=kv_unified, cache_type_k=cache_type_k.lower(),
            cache_type_v=cache_type_v.lower(), batch_size=batch_size, ubatch_size=ubatch_size,
            flash_attn=flash_attn.lower(), n_gpu_layers=parse_ngl(n_gpu_layers), n_cpu_moe=n_cpu_moe,
            cpu_moe=cpu_moe, cache_ram_mib=cache_ram, ctx_checkpoints=ctx_checkpoints, spec_type=spec_type,
            spec_draft_n_max=spec_draft_n_max, no_kv_offload=no_kv_offload,
        )
        layout = resolve_layout(model)
        hardware = hardware_for(gpu, vram)
        result = estimate_result(layout, flags, hardware)
        if check:
            from tuner.fitcheck import run_fit_check

            result["check"] = run_fit_check(layout, flags, server_bin=server_bin)
        emit(result, as_json=as_json, render=lambda c: render_estimate(c, result))

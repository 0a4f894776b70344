"""``tuner estimate``: the memory llama-server will take, per device, for a model and a flag set.

Examples:

    tuner estimate model.gguf --ctx-size 65536 --parallel 1
    tuner estimate Qwen3.5-35B-A3B-Q4_K_M-00001-of-00002.gguf -c 262144 -ctk q8_0 -ctv q8_0 --gpu rtx-4090
    tuner estimate model.gguf --n-cpu-moe 20 --gpu rtx-5080 --json
    tuner estimate model.gguf -c 32768 --check      # beside llama.cpp's own dry run (llama-fit-params)
    tuner estimate model.gguf --spec-type draft-mtp -md mtp-model-Q8_0.gguf   # drafting with an MTP sidecar
    tuner estimate model.gguf --mmproj mmproj-F16.gguf --no-mmproj-offload    # the vision projector on the CPU
    tuner estimate model.gguf --rpc 192.168.1.20:50052   # layers on an RPC worker's devices too

What this machine observed (``tuner serve``'s load logs, ``tuner calibrate``) corrects the compute buffers and the
predicted speeds (:func:`tuner.corrections.corrected_estimate`); the output says "calibrated by N runs" when it did.

The JSON's ``health`` lists what :mod:`tuner.health` finds beyond memory: a stale chat template, an MTP head the
file lacks and where one is, a vision projector left out.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tuner.cli import _options as o
from tuner.cli._options import SERVER_DEFAULTS as D
from tuner.cli._output import emit, memory_table, render_health, text
from tuner.cli.hardware import hardware_dict, network_line
from tuner.cli.profile import calibration_for
from tuner.corrections import Calibration, corrected_estimate, shape_id
from tuner.errors import TunerError
from tuner.flags import INT32_MAX, SPEC_MTP, ServerFlags
from tuner.gguf_file import read_gguf
from tuner.hardware import Hardware, HostSpec, gpu_split, hardware_for, rpc_endpoints
from tuner.layout import ModelLayout
from tuner.models import local_layout, resolve_candidate
from tuner.rpc import cluster_hardware
from tuner.speed import PLANNING_DEPTH_TOKENS, predict_on
from tuner.units import fmt_bytes
from tuner.vision import Projector, projector_from_header


def estimate_result(layout: ModelLayout, flags: ServerFlags, hardware: Hardware,
                    depth_tokens: int = PLANNING_DEPTH_TOKENS,
                    calibration: Calibration | None = None, *, draft: ModelLayout | None = None,
                    vision: Projector | None = None, mmproj_offload: bool = True,
                    health: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    est = corrected_estimate(layout, flags, hardware, calibration, draft=draft, vision=vision,
                             mmproj_offload=mmproj_offload)
    result: dict[str, Any] = {"model": layout.source or layout.name, "arch": layout.arch, **est.to_dict()}
    plain = flags.with_(spec_type=None) if flags.spec_type else flags  # MTP scales the plain prediction
    pred = predict_on(layout, plain, hardware, depth_tokens=depth_tokens)
    if calibration:
        pred = calibration.rescale(pred, layout, plain, hardware)
    if flags.spec_type == SPEC_MTP:
        from tuner.mtp import predict_mtp

        pred = predict_mtp(layout, flags, hardware, pred, draft=draft, gpu_split=gpu_split(hardware),
                           depth_tokens=depth_tokens)
    result["predicted"] = {"depth_tokens": depth_tokens, "tg_tok_s": round(pred.tg_tok_s, 2),
                           "pp_tok_s": round(pred.pp_tok_s, 2), "tg_bound_tok_s": round(pred.tg_bound_tok_s, 2)}
    if flags.spec_type == SPEC_MTP:  # what the MTP prediction assumed
        result["notes"] = [*result["notes"], *(n for n in pred.notes if n.startswith("MTP"))]
    if pred.network is not None:
        result["predicted"]["network"] = pred.network.to_dict()
    result["calibration"] = ({"line": calibration.describe(hardware),
                              **calibration.summary(hardware, shape_id(layout), est.n_ubatch)} if calibration else None)
    result["flags"] = flags.to_args()
    result["layout"] = layout.to_dict()
    result["hardware"] = hardware_dict(hardware)
    result["health"] = list(health or [])
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
    cal = result.get("calibration") or {}
    for gpu in result["hardware"]["gpus"]:
        used = next((d["total_bytes"] for d in result["memory"]["devices"] if d["name"] == gpu["name"]), 0)
        measured = ((cal.get("devices") or {}).get(gpu["name"]) or {}).get("uncounted_bytes")
        extra = (f"{fmt_bytes(measured)} of CUDA context and pools measured here" if measured is not None
                 else "~0.5-1 GiB of CUDA context and pools that llama.cpp does not count")
        console.print(f"{text(gpu['name'])} ({text(gpu['model'])}): {fmt_bytes(used)} of "
                      f"{fmt_bytes(gpu['vram_total_bytes'])} — add {extra}")
    host = result["memory"]["host"]
    console.print(f"host RAM at worst: {fmt_bytes(host['total_bytes'])} "
                  f"(of {fmt_bytes(result['hardware']['ram_available_bytes'])} available)")
    pred = result["predicted"]
    console.print(f"predicted at depth {pred['depth_tokens']}: tg {pred['tg_tok_s']:.1f} tok/s "
                  f"(bound {pred['tg_bound_tok_s']:.1f}), pp {pred['pp_tok_s']:.0f} tok/s")
    if "network" in pred:
        console.print(network_line(pred["network"]), highlight=False, soft_wrap=True)
    if cal.get("line"):
        console.print(f"[green]{text(cal['line'])}[/green] (tuner profile show; tuner profile reset clears it)")
    for note in result["notes"] + result["hardware"]["notes"]:
        console.print(f"[yellow]note:[/yellow] {text(note)}")
    render_health(console, result["health"])
    check = result.get("check")
    if check:
        table = Table(title=f"llama.cpp's own dry run ({check['tool']})", title_justify="left")
        for col in ("device", "model", "context", "compute"):
            table.add_column(col, justify="right" if col != "device" else "left")
        for row in check["devices"]:
            table.add_row(text(row["name"]), fmt_bytes(row["model_bytes"]), fmt_bytes(row["context_bytes"]),
                          fmt_bytes(row["compute_bytes"]))
        console.print(table)
        for note in check.get("notes", []):
            console.print(f"[dim]{text(note)}[/dim]")


def register(app: typer.Typer) -> None:
    @app.command("estimate")
    def estimate_cmd(
        model: o.ModelArg,
        ctx_size: o.CtxSizeOpt = D.ctx_size,
        parallel: o.ParallelOpt = D.parallel,
        kv_unified: o.KvUnifiedOpt = D.kv_unified,
        cache_type_k: o.CacheTypeKOpt = D.cache_type_k,
        cache_type_v: o.CacheTypeVOpt = D.cache_type_v,
        batch_size: o.BatchOpt = D.batch_size,
        ubatch_size: o.UbatchOpt = D.ubatch_size,
        flash_attn: o.FlashAttnOpt = D.flash_attn,
        n_gpu_layers: o.NglOpt = D.n_gpu_layers,
        n_cpu_moe: o.NCpuMoeOpt = D.n_cpu_moe,
        cpu_moe: o.CpuMoeOpt = D.cpu_moe,
        cache_ram_mib: o.CacheRamOpt = D.cache_ram_mib,
        ctx_checkpoints: o.CtxCheckpointsOpt = D.ctx_checkpoints,
        spec_type: o.SpecTypeOpt = D.spec_type,
        spec_draft_n_max: o.SpecDraftOpt = D.spec_draft_n_max,
        no_kv_offload: o.NoKvOffloadOpt = D.no_kv_offload,
        split_mode: o.SplitModeOpt = D.split_mode,
        main_gpu: o.MainGpuOpt = D.main_gpu,
        device: o.DeviceOpt = D.device,
        tensor_split: o.TensorSplitOpt = D.tensor_split,
        override_tensor: o.OverrideTensorOpt = D.override_tensor,
        spec_draft_model: o.SpecDraftModelOpt = None,
        mmproj: o.MmprojOpt = None,
        mmproj_offload: o.MmprojOffloadOpt = True,
        rpc: o.RpcOpt = D.rpc,
        rpc_gpu: o.RpcGpuOpt = None,
        link_gbit: o.LinkGbitOpt = None,
        link_rtt_ms: o.LinkRttOpt = None,
        gpu: o.GpuOpt = None,
        vram: o.VramOpt = None,
        check: Annotated[bool, typer.Option("--check", help="Also run llama-fit-params' dry run.")] = False,
        depth: Annotated[int, typer.Option("--depth", min=0, max=INT32_MAX, help="Tokens already in the context, "
                                           "for the predicted speeds.")] = PLANNING_DEPTH_TOKENS,
        ram: o.RamOpt = None,
        ram_bandwidth: o.RamBandwidthOpt = None,
        cpu_cores: o.CpuCoresOpt = None,
        server_bin: o.ServerBinOpt = None,
        as_json: o.JsonOpt = False,
    ) -> None:
        """Estimate the memory llama-server takes on each device for MODEL and the given flags."""
        # the parameters are named after ServerFlags' fields; values are read as llama-server reads them
        flags = ServerFlags.from_values(dict(
            rpc=rpc, ctx_size=ctx_size, parallel=parallel, kv_unified=kv_unified, cache_type_k=cache_type_k,
            cache_type_v=cache_type_v, batch_size=batch_size, ubatch_size=ubatch_size, flash_attn=flash_attn,
            n_gpu_layers=n_gpu_layers, n_cpu_moe=n_cpu_moe, cpu_moe=cpu_moe, cache_ram_mib=cache_ram_mib,
            ctx_checkpoints=ctx_checkpoints, spec_type=spec_type, spec_draft_n_max=spec_draft_n_max,
            no_kv_offload=no_kv_offload, split_mode=split_mode, main_gpu=main_gpu, device=device,
            tensor_split=tensor_split, override_tensor=override_tensor))
        candidate = resolve_candidate(model)
        layout = candidate.layout
        draft = None
        if spec_draft_model:
            if flags.spec_type != SPEC_MTP:  # llama-server loads any -md model and drafts with it (has_dft)
                raise TunerError("-md is sized only as the MTP sidecar of --spec-type draft-mtp: without it "
                                 "llama-server loads the file as a draft model with a context of its own "
                                 "(tools/server/server-context.cpp:1000-1004, 1101-1118), which tuner does not "
                                 "size; add --spec-type draft-mtp or drop -md")
            draft = local_layout(spec_draft_model)
        elif flags.spec_type == SPEC_MTP and not layout.has_mtp:
            draft = candidate.mtp_draft  # the sidecar found beside the model (-md)
        vision = None
        if mmproj:
            try:
                vision = projector_from_header(read_gguf(mmproj))
            except TunerError as exc:
                raise TunerError(f"--mmproj {mmproj}: {exc}") from None
        from tuner import health as model_health
        from tuner.mtp import drafting_blocked
        from tuner.placement import devices_of

        host = HostSpec.from_options(ram, ram_bandwidth, cpu_cores)
        hardware = cluster_hardware(hardware_for(gpu, vram, host=host), rpc=rpc or None, rpc_gpu=rpc_gpu,
                                    link_gbit=link_gbit, link_rtt_ms=link_rtt_ms, server_bin=server_bin)
        flags = flags.with_(rpc=rpc_endpoints(hardware.gpus))
        blocked = drafting_blocked(layout, flags, devices_of(hardware), vision=vision is not None)
        health = model_health.check(candidate, vision=vision is not None, mtp_blocked=blocked).to_list()
        result = estimate_result(layout, flags, hardware, depth, calibration_for(hardware, server_bin), draft=draft,
                                 vision=vision, mmproj_offload=mmproj_offload, health=health)
        if check:
            from tuner.fitcheck import run_fit_check

            result["check"] = run_fit_check(layout, flags, server_bin=server_bin, mmproj=mmproj,
                                            draft_model=draft.source if draft and flags.spec_type == SPEC_MTP else None)
        emit(result, as_json=as_json, render=lambda c: render_estimate(c, result))

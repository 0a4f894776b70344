"""``tuner recommend``: the fastest llama-server setup that fits, with the reasons and the exact command.

Examples:

    tuner recommend                                   # Qwen3.5-35B-A3B's quant ladder on this machine
    tuner recommend --gpu rtx-5080                    # plan for a catalog card (on an assumed 64 GiB desktop)
    tuner recommend --gpu rtx-5080 --ram 32G --cpu-cores 6   # … on the host you have in mind
    tuner recommend --gpu rtx-4090 --prefer speed     # the fastest plan of at least 4 bits/weight
    tuner recommend --gpu rtx-3090 --prefer context   # the most context, then speed
    tuner recommend qwen3.6-35b-a3b --gpu rtx-4090 --ctx-size 131072 --parallel 2
    tuner recommend model.gguf --vram 12G --buffer 1G --cache-type q8_0
    tuner recommend --gpu none --json                 # CPU only, one JSON document
    tuner recommend qwen3.5-122b-a10b --rpc 192.168.1.20:50052   # with an RPC worker's devices (tuner worker)
    tuner recommend qwen3.5-397b-a17b --gpu rtx-3090x2 \
        --rpc-gpu rtx-3090x2@10.0.0.2,rtx-3090x2@10.0.0.3,rtx-3090x2@10.0.0.4   # a cluster you do not have yet

Speeds are tuner.speed's roofline predictions, or what ``tuner bench`` measured on this machine for the same model,
flags, hardware and build (shown as measured).

The JSON's ``health`` lists what :mod:`tuner.health` finds beyond memory (a stale chat template and its fix, an MTP
head the file lacks and where one is, a vision projector left out), printed as warnings and notes.
"""

from __future__ import annotations

import re
import shlex
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from tuner.cli import _options as o
from tuner.cli._output import emit, memory_table, render_health, text
from tuner.cli.hardware import hardware_dict, network_line, render_hardware
from tuner.cli.profile import calibration_for, recommend_hook
from tuner.hardware import HostSpec, hardware_for
from tuner.placement import describe, devices_of
from tuner.planner import Recommendation, Wishes, plan_for
from tuner.rpc import cluster_hardware, memory_by_host
from tuner.server import CHILD_ENV
from tuner.units import fmt_bytes, parse_size_bytes
from tuner.untrusted import visible


def wishes_from_options(*, ctx_size: int | None, parallel: int, prefer: str, vision: bool, buffer: str | None,
                        quant: str | None, cache_type: str | None, allow_yarn: bool,
                        mmproj_offload: bool = True) -> Wishes:
    """The planner's wishes from the shared planner options (``recommend``, ``serve`` and ``bench`` alike)."""
    return Wishes(ctx_size=ctx_size or None, parallel=parallel, prefer=prefer.lower(), vision=vision,
                  mmproj_offload=mmproj_offload,
                  buffer_bytes=parse_size_bytes(buffer, default_unit="g") if buffer is not None else None,
                  quant=quant, allow_yarn=allow_yarn, cache_type=cache_type.lower() if cache_type else None)


def recommend_result(rec: Recommendation, server_bin: str = "llama-server") -> dict[str, Any]:
    from tuner import health

    found = health.check(rec.plan.candidate, vision=rec.plan.vision, mtp_blocked=rec.plan.mtp_blocked)
    result = {**rec.to_dict(server_bin), "hardware": hardware_dict(rec.hardware), "health": found.to_list()}
    p = rec.plan
    if len(rec.hardware.gpus) > 1:  # several devices: what each holds, against its budget
        result["placement"] = [share.to_dict() for share in describe(
            p.candidate.layout, p.flags, devices_of(rec.hardware), p.budget.device_budgets(p.estimate),
            p.estimate)]
    if len(rec.hardware.local_gpus) > 1:
        # the CUDA runtime numbers the fastest card first unless told otherwise: CUDAn must be NVML's GPU n, the
        # order the split is planned in (tuner's own launches set it too, tuner.server.CHILD_ENV)
        result["env"] = {"CUDA_DEVICE_ORDER": CHILD_ENV["CUDA_DEVICE_ORDER"]}
    hosts = memory_by_host(rec.plan.estimate, rec.hardware)
    if hosts:
        result["hosts"] = [h.to_dict() for h in hosts]
    return result


def hosts_table(hosts: list[dict[str, Any]]) -> Table:
    """The plan's memory per machine: each RPC worker's devices, then this machine's GPUs and RAM."""
    table = Table(title="Memory per machine (estimate)", title_justify="left")
    for col in ("machine", "devices", "planned", "free"):
        table.add_column(col, justify="right" if col in ("planned", "free") else "left")
    for h in hosts:
        table.add_row(text(h["host"]), text(", ".join(h["devices"])), fmt_bytes(h["planned_bytes"]),
                      fmt_bytes(h["free_bytes"]))
    return table


def _tok_s(value: float) -> str:
    return f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def _experts_in_ram(result: dict[str, Any]) -> str:
    plan, placement = result["plan"], result.get("placement")
    if placement:
        n = sum(d["expert_tensors_in_ram"] for d in placement)
        return f"{n} expert tensors (-ot rules)" if n else "none (all on the GPUs)"
    if not result["budget"]["gpus"]:
        return "everything (no GPU)"
    return f"--n-cpu-moe {plan['n_cpu_moe']}" if plan["n_cpu_moe"] else "none (all on the GPU)"


#: Below this many columns the report takes its narrow layout: no wide tables, hanging indents, the command in
#: continued lines. The wide alternatives table needs about this much to keep its reasons readable.
WIDE_COLUMNS = 110


def _bullets(marker: str, lines: list[str], style: str = "") -> Table:
    """Lines under a marker (``•``, ``note:``) with a hanging indent, so wrapped text stays under its first word."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True, style=style)
    grid.add_column(ratio=1, overflow="fold")
    for line in lines:
        grid.add_row(marker, text(line))
    return grid


def _hardware_narrow(console: Console, hw: dict[str, Any]) -> None:
    grid = Table.grid(padding=(0, 1))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(ratio=1, overflow="fold")
    for g in hw["gpus"]:
        grid.add_row(f"GPU {text(g['name'])}", f"{text(g['model'])}: {fmt_bytes(g['vram_free_bytes'])} free of "
                     f"{fmt_bytes(g['vram_total_bytes'])}, {g['mem_bandwidth_bytes_s'] / 1e9:.0f} GB/s"
                     + (f", PCIe gen{g['pcie_gen']} x{g['pcie_width']}" if g["pcie_gen"] else "")
                     + (f", CC {g['compute_capability']}" if g["compute_capability"] else "") + f" ({g['source']})")
    if not hw["gpus"]:
        grid.add_row("GPU", "none (planning for CPU and RAM only)")
    grid.add_row("CPU", f"{text(hw['cpu_model'])} ({hw['cpu_physical_cores']} cores, "
                        f"{hw['cpu_logical_cores']} threads)")
    grid.add_row("RAM", f"{fmt_bytes(hw['ram_available_bytes'])} available of {fmt_bytes(hw['ram_total_bytes'])}, "
                        f"assumed {hw['ram_bandwidth_bytes_s'] / 1e9:.0f} GB/s")
    if "network" in hw:
        link = hw["network"]
        grid.add_row("network", f"to the RPC workers: {link['gbit_s']:g} Gbit/s, {link['rtt_ms']:g} ms round trip")
    console.print(grid)
    if hw["notes"]:
        console.print(_bullets("note:", hw["notes"], style="yellow"))


_SPILLED_BLOCKS_RE = re.compile(r"^blk\\\.\(([0-9|]+)\)\\\.ffn_")


def _experts_setting(a: dict[str, Any]) -> str:
    """How a plan keeps experts in RAM, as its command says it: ``-ot`` rules per device on several devices (their
    blocks counted), else ``--n-cpu-moe N``."""
    blocks = {int(n) for rule in a.get("override_tensor") or () for m in [_SPILLED_BLOCKS_RE.match(rule)] if m
              for n in m.group(1).split("|")}
    if blocks:
        return f"-ot: experts of {len(blocks)} layers in RAM"
    if len(a.get("tensor_split") or ()) > 1 and not a["n_cpu_moe"]:
        return "-ot: none in RAM"
    return f"--n-cpu-moe {a['n_cpu_moe']}"


def _alternatives_wide(alternatives: list[dict[str, Any]]) -> Table:
    alt = Table(title="Alternatives", title_justify="left")
    for col in ("#", "quant", "KV", "experts in RAM", "context", "ubatch", "tg tok/s", "pp tok/s", "why not"):
        alt.add_column(col, justify="right" if col not in ("quant", "KV", "why not") else "left")
    for i, a in enumerate(alternatives, 1):
        alt.add_row(str(i), text(a["quant"]), a["cache_type_k"], _experts_setting(a), str(a["ctx_size"]),
                    str(a["ubatch_size"]), _tok_s(a["predicted"]["tg_tok_s"])
                    + (" (measured)" if a["predicted"]["source"] == "measured" else ""),
                    _tok_s(a["predicted"]["pp_tok_s"]), text(a["why_not"]))
    return alt


def _alternatives_narrow(alternatives: list[dict[str, Any]]) -> Table:
    """One block per alternative: its settings and speeds on a line, why it lost under it."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(justify="right", no_wrap=True)
    grid.add_column(ratio=1, overflow="fold")
    for i, a in enumerate(alternatives, 1):
        p = a["predicted"]
        head = (f"[bold]{text(a['quant'])}[/bold] · KV {a['cache_type_k']} · {_experts_setting(a)} · "
                f"context {a['ctx_size']} · ubatch {a['ubatch_size']} · {_tok_s(p['tg_tok_s'])} tok/s generation"
                + (" (measured)" if p["source"] == "measured" else "") + f", {_tok_s(p['pp_tok_s'])} prompt")
        grid.add_row(f"{i}.", head)
        grid.add_row("", f"[dim]why not: {text(a['why_not'])}[/dim]")
    return grid


def command_lines(args: list[str], width: int) -> list[str]:
    """A command as shell lines no wider than ``width`` where it can be (a single long argument cannot be cut),
    continued with `` \\``: the binary with its model first, then each option with its value, kept together."""
    quoted = [visible(shlex.quote(a)) for a in args]
    groups: list[str] = []
    i = 0
    while i < len(quoted):
        take = 3 if i == 0 and len(quoted) > 2 else 2 if i + 1 < len(quoted) and not args[i + 1].startswith("-") \
            else 1
        groups.append(" ".join(quoted[i:i + take]))
        i += take
    lines: list[str] = []
    for group in groups:
        if lines and len(lines[-1]) + 1 + len(group) + 2 <= width:
            lines[-1] += " " + group
        else:
            lines.append(("  " if lines else "") + group)
    return [line + " \\" for line in lines[:-1]] + lines[-1:]


def render_recommendation(console: Console, result: dict[str, Any]) -> None:
    narrow = console.width < WIDE_COLUMNS
    if narrow:
        _hardware_narrow(console, result["hardware"])
    else:
        render_hardware(console, result["hardware"])
    plan, pred, budget = result["plan"], result["predicted"], result["budget"]
    console.print()
    console.print(f"[bold]Plan:[/bold] {text(plan['model'])} [bold]{text(plan['quant'])}[/bold] "
                  f"({plan['bits_per_weight']} bits/weight, {fmt_bytes(plan['file_bytes'])}"
                  + (f", {text(plan['repo'])}" if plan["repo"] else "") + f") — file {text(plan['file'])}")
    table = Table(show_header=False, box=None, pad_edge=False)
    table.add_column(style="dim")
    table.add_column()
    ctx = f"{plan['ctx_size']}"
    if plan["parallel"] > 1:
        ctx += f" ({plan['ctx_per_slot']} per slot × {plan['parallel']} slots)"
    for key, value in (
        ("KV cache", f"K {plan['cache_type_k']}, V {plan['cache_type_v']}"),
        ("experts in RAM", _experts_in_ram(result)),
        ("GPU layers", str(plan["n_gpu_layers"]) if budget["gpus"] else "-"),
        ("context", ctx),
        ("slots", str(plan["parallel"])),
        ("batch / ubatch", f"{plan['batch_size']} / {plan['ubatch_size']}"),
        ("flash attention", plan["flash_attn"]),
        ("prompt cache / checkpoints", f"{plan['cache_ram_mib']} MiB / {plan['ctx_checkpoints']} per slot"),
    ):
        table.add_row(key, value)
    console.print(table)
    policy = result.get("policy") or {}
    console.print(_bullets("Policy:", [f"{policy.get('name', '?')} — {policy.get('rule', '')}"], style="bold"))
    if result.get("warnings"):
        console.print(_bullets("warning:", result["warnings"], style="bold red"))
    console.print(_bullets("  •", result["reasons"]))

    console.print()
    console.print(memory_table(result["memory"], title="Memory (estimate)", narrow=narrow))
    devices = {d["name"]: d for d in result["memory"]["devices"]}
    left = result["headroom_bytes"]
    slots = {d["name"]: d for d in result.get("placement") or []}
    for gpu in budget["gpus"]:
        used = devices.get(gpu["name"], {}).get("total_bytes", 0)
        where = slots.get(gpu["name"])
        held = (f" ({where['slots']} layers" + (", the output layer" if where["output_layer"] else "")
                + (f", {where['expert_tensors_in_ram']} expert tensors in RAM" if where["expert_tensors_in_ram"]
                   else "") + ")") if where else ""
        console.print(f"{text(gpu['name'])}{held}: {fmt_bytes(used)} planned of "
                      f"{fmt_bytes(gpu['vram_free_bytes'])} free; "
                      f"buffer {fmt_bytes(budget['buffer_bytes'])} kept"
                      + (f", {fmt_bytes(budget['reserved_bytes'])} for the vision projector"
                         if budget["reserved_bytes"] and budget["reserved_on"] == gpu["name"] else "")
                      + f", {fmt_bytes(left[gpu['name']])} more to spare")
    if result.get("hosts"):
        console.print(hosts_table(result["hosts"]))
    host = result["memory"]["host"]
    console.print(f"RAM at worst: {fmt_bytes(host['total_bytes'])} of {fmt_bytes(budget['ram_available_bytes'])} "
                  f"available" + (f" (buffer {fmt_bytes(budget['buffer_bytes'])})" if not budget["gpus"] else "")
                  + (f", {fmt_bytes(budget['reserved_bytes'])} kept for the vision projector"
                     if budget["reserved_bytes"] and budget["reserved_on"] == "CPU" else "")
                  + f", {fmt_bytes(left['CPU'])} to spare")

    console.print()
    source = {"measured": "measured", "rescaled": "predicted, rescaled by bench measurements",
              "calibrated": "predicted, calibrated"}.get(pred["source"], "predicted (roofline)")
    console.print(f"[bold]Speed, {source}:[/bold] generation {_tok_s(pred['tg_tok_s'])} tok/s "
                  f"(bound {_tok_s(pred['tg_bound_tok_s'])}, efficiency {pred['efficiency']:.2f}), prompt "
                  f"{_tok_s(pred['pp_tok_s'])} tok/s (bound {_tok_s(pred['pp_bound_tok_s'])})")
    if "network" in pred:
        console.print(_bullets(" ", [network_line(pred["network"])]))
    if pred["notes"]:
        console.print(_bullets(" ", pred["notes"], style="dim"), style="dim")

    if result["alternatives"]:
        console.print()
        if narrow:
            console.print("[bold]Alternatives[/bold]")
            console.print(_alternatives_narrow(result["alternatives"]))
        else:
            console.print(_alternatives_wide(result["alternatives"]))
    if result["notes"]:
        console.print(_bullets("note:", result["notes"], style="yellow"))
    if result.get("calibration"):
        console.print(f"[green]{text(result['calibration']['line'])}[/green]")
    render_health(console, result["health"])
    console.print()
    env = " ".join(f"{k}={v}" for k, v in (result.get("env") or {}).items())
    if env:  # the JSON's command array leaves it to "env": say it here, where the command is copied from
        console.print(f"[bold]Command[/bold] (keep {env} in front: CUDA numbers the fastest card first otherwise, and "
                      "the split is planned in PCI bus order):")
    else:
        console.print("[bold]Command:[/bold]")
    if narrow:
        if env:
            console.print(env + " \\", soft_wrap=True, markup=False, highlight=False)
        for line in command_lines(result["command"], console.width):
            console.print(line, soft_wrap=True, markup=False, highlight=False)
    else:
        console.print(visible((env + " " if env else "") + shlex.join(result["command"])), soft_wrap=True,
                      markup=False, highlight=False)
    console.print(f"[dim]planned in {result['planning_s'] * 1000:.0f} ms[/dim]")


def register(app: typer.Typer) -> None:
    @app.command("recommend")
    def recommend_cmd(
        model: o.OptionalModelArg = None,
        ctx_size: o.PlanCtxOpt = None,
        parallel: o.PlanParallelOpt = 1,
        prefer: o.PreferOpt = o.DEFAULT_PREFER,
        vision: o.VisionOpt = False,
        mmproj_offload: o.MmprojOffloadOpt = True,
        buffer: o.BufferOpt = None,
        quant: o.QuantOpt = None,
        cache_type: o.CacheTypeOpt = None,
        allow_yarn: o.AllowYarnOpt = False,
        gpu: o.GpuOpt = None,
        vram: o.VramOpt = None,
        ram: o.RamOpt = None,
        ram_bandwidth: o.RamBandwidthOpt = None,
        cpu_cores: o.CpuCoresOpt = None,
        rpc: o.PlanRpcOpt = None,
        rpc_gpu: o.RpcGpuOpt = None,
        link_gbit: o.LinkGbitOpt = None,
        link_rtt_ms: o.LinkRttOpt = None,
        server_bin: o.ServerBinOpt = None,
        as_json: o.JsonOpt = False,
    ) -> None:
        """Recommend quant, KV cache, --n-cpu-moe, context and batch sizes for MODEL on this machine (or --gpu)."""
        wishes = wishes_from_options(ctx_size=ctx_size, parallel=parallel, prefer=prefer, vision=vision,
                                     buffer=buffer, quant=quant, cache_type=cache_type, allow_yarn=allow_yarn,
                                     mmproj_offload=mmproj_offload)
        host = HostSpec.from_options(ram, ram_bandwidth, cpu_cores)
        hardware = cluster_hardware(hardware_for(gpu, vram, host=host), rpc=rpc, rpc_gpu=rpc_gpu,
                                    link_gbit=link_gbit, link_rtt_ms=link_rtt_ms, server_bin=server_bin)
        rec = plan_for(model, hardware, wishes, measured=recommend_hook(hardware, server_bin),
                       calibration=calibration_for(hardware, server_bin))
        result = recommend_result(rec, server_bin or "llama-server")
        emit(result, as_json=as_json, render=lambda c: render_recommendation(c, result))

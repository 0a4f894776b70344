"""Option types shared by every command, declared once. Long names are llama-server's own, so a user can paste
flags from a llama-server command line."""

from __future__ import annotations

from typing import Annotated

import typer

ModelArg = Annotated[str, typer.Argument(
    help="A .gguf file, the first shard of a split model, a folder of quants, a card such as "
         "qwen3.5-35b-a3b:Q4_K_M, or a Hugging Face repo owner/name[:QUANT].", show_default=False)]
OptionalModelArg = Annotated[str | None, typer.Argument(
    help="As for estimate; default: the Qwen3.5-35B-A3B card.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]

GpuOpt = Annotated[str | None, typer.Option(
    "--gpu", help="Plan for a catalog GPU instead of the detected ones (rtx-4090, h100-80gb, … ; 'none' = CPU only).")]
VramOpt = Annotated[str | None, typer.Option("--vram", help="Override GPU memory, e.g. 16G.")]
ServerBinOpt = Annotated[str | None, typer.Option("--server-bin", help="Use this llama-server binary.")]

CtxSizeOpt = Annotated[int, typer.Option("--ctx-size", "-c", help="Context size (0 = the model's).")]
ParallelOpt = Annotated[int, typer.Option("--parallel", "-np", help="Slots (-1 = llama-server's auto: 4, unified).")]
KvUnifiedOpt = Annotated[bool | None, typer.Option("--kv-unified/--no-kv-unified", "-kvu/-no-kvu",
                                                   help="One KV pool shared by all slots.")]
CacheTypeKOpt = Annotated[str, typer.Option("--cache-type-k", "-ctk", help="K cache type.")]
CacheTypeVOpt = Annotated[str, typer.Option("--cache-type-v", "-ctv", help="V cache type.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", "-b", help="Logical batch size.")]
UbatchOpt = Annotated[int, typer.Option("--ubatch-size", "-ub", help="Physical batch size.")]
FlashAttnOpt = Annotated[str, typer.Option("--flash-attn", "-fa", help="on, off or auto.")]
NglOpt = Annotated[str, typer.Option("--n-gpu-layers", "-ngl", help="Layers on the GPU: a number, 'all' or 'auto'.")]
NCpuMoeOpt = Annotated[int, typer.Option("--n-cpu-moe", "-ncmoe",
                                                    help="Keep the experts of the first N layers on the CPU.")]
CpuMoeOpt = Annotated[bool, typer.Option("--cpu-moe", "-cmoe", help="Keep all expert tensors on the CPU.")]
CacheRamOpt = Annotated[int, typer.Option("--cache-ram", "-cram", help="Prompt cache limit in MiB (0 = off).")]
CtxCheckpointsOpt = Annotated[int, typer.Option("--ctx-checkpoints", "-ctxcp",
                                                help="Context checkpoints per slot (hybrid models).")]
SpecTypeOpt = Annotated[str | None, typer.Option("--spec-type", help="Speculative decoding: draft-mtp.")]
SpecDraftOpt = Annotated[int, typer.Option("--spec-draft-n-max", help="Tokens drafted per step.")]
NoKvOffloadOpt = Annotated[bool, typer.Option("--no-kv-offload", "-nkvo", help="Keep KV and state on the CPU.")]

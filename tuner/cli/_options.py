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

# Building llama.cpp (tuner build, tuner serve).
SourceOpt = Annotated[str, typer.Option(
    "--source", help="llama.cpp to build: pypi[:VERSION] (llama-cpp-python's vendored copy), git[:REF] or a "
                     "llama.cpp directory.")]
CudaOpt = Annotated[bool | None, typer.Option(
    "--cuda/--no-cuda", help="Build with CUDA (default: only when NVML sees a GPU and nvcc is installed).",
    show_default=False)]

# Planner wishes (recommend, serve, bench): what the user asks for; the planner decides the rest. The defaults in the
# help texts are tuner.planner's (not imported here: every command loads this module); a test keeps them equal.
PlanCtxOpt = Annotated[int | None, typer.Option(
    "--ctx-size", "-c", help="Context per slot (default: the largest that fits, at least 32768 if it can).",
    show_default=False)]
PlanParallelOpt = Annotated[int, typer.Option("--parallel", "-np", help="Slots (concurrent requests).")]
PreferOpt = Annotated[str, typer.Option("--prefer", help="What to favour: speed, quality or context.")]
VisionOpt = Annotated[bool, typer.Option("--vision/--no-vision", help="Load the vision projector (mmproj).")]
BufferOpt = Annotated[str | None, typer.Option(
    "--buffer", help="Memory to keep free on each GPU, e.g. 1.5G (default 1.25G; RAM when CPU only: 1G).",
    show_default=False)]
QuantOpt = Annotated[str | None, typer.Option("--quant", help="Use this quant (Q4_K_M, UD-Q4_K_XL, …).",
                                              show_default=False)]
CacheTypeOpt = Annotated[str | None, typer.Option(
    "--cache-type", "-ct", help="KV cache type for K and V (f16, q8_0, q4_0; default: chosen).", show_default=False)]
AllowYarnOpt = Annotated[bool, typer.Option("--allow-yarn", help="Allow context beyond the native length (YaRN).")]

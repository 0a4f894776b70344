"""Option types shared by every command, declared once. Long names are llama-server's own, so a user can paste
flags from a llama-server command line."""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace
from typing import Annotated, Any

import typer

from tuner.flags import FLAGS, INT32_MAX, Kind


def server_option(key: str, *, help: str | None = None, **kwargs: Any) -> Any:
    """The typer option of llama-server's flag ``key`` as :data:`tuner.flags.FLAGS` spells it: long name, short
    aliases, a switch's negation (``--kv-unified/--no-kv-unified``), the choices as the metavar."""
    row = FLAGS[key]
    if row.kind is Kind.INT:  # llama-server reads its numbers as C ints: a larger one is refused as typer refuses
        kwargs.setdefault("max", INT32_MAX)
    decls = list(row.names)
    if row.negation:
        pairs = list(zip(row.names, row.negation, strict=False))  # long with long, short with short
        decls = [f"{on}/{off}" for on, off in pairs] + list(row.names[len(pairs):])
    return typer.Option(*decls, help=help or row.help, metavar=row.metavar, **kwargs)


def finite(value: float | None) -> float | None:
    """A typer callback: refuse ``nan`` and ``inf`` (click's FloatRange lets ``nan`` through: it compares false)."""
    if value is not None and not math.isfinite(value):
        raise typer.BadParameter(f"{value} is not a finite number")
    return value


def output_file(value: Path | None) -> Path | None:
    """A typer callback for a file tuner will write: not an existing folder, and not inside a file."""
    if value is None:
        return None
    if value.is_dir():
        raise typer.BadParameter(f"{value} is a folder; name a file")
    parent = next((p for p in value.absolute().parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise typer.BadParameter(f"{parent} is a file, so {value} cannot be written")
    return value


def output_folder(value: Path | None) -> Path | None:
    """A typer callback for a folder tuner will create or write into: not an existing file, nor inside one."""
    if value is None:
        return None
    existing = next((p for p in (value.absolute(), *value.absolute().parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise typer.BadParameter(f"{existing} is a file, not a folder")
    return value


def default(key: str) -> Any:
    """llama-server's default for ``key``, as its typer option takes it (``-ngl``: ``all``; a list: its text, ``""``;
    a repeatable option: None, typer's "not given")."""
    row = FLAGS[key]
    if row.repeat:
        return None
    return row.format(row.default) if row.kind is Kind.LAYERS or row.list_sep is not None else row.default


#: llama-server's defaults as the options take them, by ServerFlags field: ``SERVER_DEFAULTS.ctx_size``.
SERVER_DEFAULTS = SimpleNamespace(**{row.key: default(row.key) for row in FLAGS.planned})


ModelArg = Annotated[str, typer.Argument(
    help="A .gguf file, the first shard of a split model, a folder of quants, a card such as "
         "qwen3.5-35b-a3b:Q4_K_M, or a Hugging Face repo owner/name[:QUANT].", show_default=False)]
OptionalModelArg = Annotated[str | None, typer.Argument(
    help="As for estimate; default: the Qwen3.5-35B-A3B card.", show_default=False)]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]

GpuOpt = Annotated[str | None, typer.Option(
    "--gpu", help="Plan for catalog GPUs instead of the detected ones: rtx-4090, 2xrtx-3090, rtx-3090,rtx-3060 (CUDA0 "
                  "first); 'none' = CPU only.")]
VramOpt = Annotated[str | None, typer.Option("--vram", help="Override GPU memory, e.g. 16G.")]
ServerBinOpt = Annotated[str | None, typer.Option("--server-bin", help="Use this llama-server binary.")]

# A host you don't own (tuner.hardware.HostSpec): with a catalog --gpu, what is not given is assumed (64 GiB, 8 cores).
RamOpt = Annotated[str | None, typer.Option(
    "--ram", help="Plan for a host with this much RAM installed, e.g. 64G (4 GiB of it kept for the OS). Default: "
                  "this machine's; with a catalog --gpu, a desktop built for it (64 GiB or more).",
    show_default=False)]
RamBandwidthOpt = Annotated[float | None, typer.Option(
    "--ram-bandwidth", min=0.1, max=100_000.0, callback=finite,
    help="Host RAM bandwidth in GB/s (default: assumed from the cores: 50, or 100 past 16 cores).",
    show_default=False)]
CpuCoresOpt = Annotated[int | None, typer.Option("--cpu-cores", min=1, max=1 << 16, help="Host physical CPU cores.",
                                                 show_default=False)]

# llama-server's own flags (tuner estimate; the planner's wishes below reuse ctx_size and parallel): names, help and
# defaults come from tuner.flags, the one table of llama-server's flags (tests/test_flags.py holds these to it).
CtxSizeOpt = Annotated[int, server_option("ctx_size")]
ParallelOpt = Annotated[int, server_option("parallel")]
KvUnifiedOpt = Annotated[bool | None, server_option("kv_unified")]
CacheTypeKOpt = Annotated[str, server_option("cache_type_k")]
CacheTypeVOpt = Annotated[str, server_option("cache_type_v")]
BatchOpt = Annotated[int, server_option("batch_size")]
UbatchOpt = Annotated[int, server_option("ubatch_size")]
FlashAttnOpt = Annotated[str, server_option("flash_attn")]
NglOpt = Annotated[str, server_option("n_gpu_layers")]
NCpuMoeOpt = Annotated[int, server_option("n_cpu_moe")]
CpuMoeOpt = Annotated[bool, server_option("cpu_moe")]
CacheRamOpt = Annotated[int, server_option("cache_ram_mib")]
CtxCheckpointsOpt = Annotated[int, server_option("ctx_checkpoints")]
SpecTypeOpt = Annotated[str | None, server_option("spec_type")]
SpecDraftOpt = Annotated[int, server_option("spec_draft_n_max")]
NoKvOffloadOpt = Annotated[bool, server_option("no_kv_offload")]
SplitModeOpt = Annotated[str, server_option("split_mode")]
MainGpuOpt = Annotated[int, server_option("main_gpu")]
DeviceOpt = Annotated[str, server_option("device")]
TensorSplitOpt = Annotated[str, server_option("tensor_split")]
OverrideTensorOpt = Annotated[list[str] | None, server_option("override_tensor")]
SpecDraftModelOpt = Annotated[str | None, server_option("spec_draft_model", show_default=False)]
MmprojOpt = Annotated[str | None, server_option("mmproj", show_default=False)]
MmprojOffloadOpt = Annotated[bool, server_option("mmproj_offload")]

# RPC workers (estimate, recommend, serve, bench): llama.cpp's --rpc, and what tuner adds to plan around it.
RpcOpt = Annotated[str, server_option("rpc", show_default=False)]
PlanRpcOpt = Annotated[str | None, server_option("rpc", show_default=False)]
RpcGpuOpt = Annotated[str | None, typer.Option(
    "--rpc-gpu", help="RPC workers from the catalog, to plan a cluster you do not have yet: CARD[xN]@HOST[:PORT],... "
                      "(rtx-3090x2@192.168.1.20; port 50052 if none). With --rpc: the cards those workers hold.",
    show_default=False)]
LinkGbitOpt = Annotated[float | None, typer.Option(
    "--link-gbit", min=0.001, max=1e5, callback=finite,
    help="Network to the RPC workers, Gbit/s (default: 1, gigabit Ethernet).", show_default=False)]
LinkRttOpt = Annotated[float | None, typer.Option(
    "--link-rtt-ms", min=0.0, max=1e6, callback=finite, help="Round-trip time to the RPC workers, ms (default: 0.2).",
    show_default=False)]

# Building llama.cpp (tuner build, tuner serve).
SourceOpt = Annotated[str, typer.Option(
    "--source", help="llama.cpp to build: pypi[:VERSION] (llama-cpp-python's vendored copy), git[:REF] or a "
                     "llama.cpp directory.")]
CudaOpt = Annotated[bool | None, typer.Option(
    "--cuda/--no-cuda", help="Build with CUDA (default: only when NVML sees a GPU and nvcc is installed).",
    show_default=False)]

# Planner wishes (recommend, serve, bench): what the user asks for; the planner decides the rest. The defaults in the
# help texts are tuner.planner's (not imported here: every command loads this module); a test keeps them equal.
PlanCtxOpt = Annotated[int | None, server_option(
    "ctx_size", help="Context per slot (default: the largest that fits, at least 65536 if it can; 32768 with "
                     "--prefer speed or quality).",
    show_default=False)]
PlanParallelOpt = Annotated[int, server_option("parallel", help="Slots (concurrent requests).")]
PREFER_CHOICES = ("balanced", "speed", "quality", "context")  # tuner.planner.PREFERENCES (a test keeps them equal)
DEFAULT_PREFER = PREFER_CHOICES[0]
PreferOpt = Annotated[str, typer.Option(
    "--prefer", metavar=f"[{'|'.join(PREFER_CHOICES)}]",
    help="What to favour. balanced (default): Q4_K_M-class quality and 65536 tokens per slot where they fit, then "
         "more context and a better quant within 10% of the fastest such plan; speed; quality; context.")]
VisionOpt = Annotated[bool, typer.Option("--vision/--no-vision", help="Load the vision projector (mmproj).")]
BufferOpt = Annotated[str | None, typer.Option(
    "--buffer", help="Memory to keep free on each GPU, e.g. 1.5G (default 1.25G; RAM when CPU only: 1G).",
    show_default=False)]
QuantOpt = Annotated[str | None, typer.Option("--quant", help="Use this quant (Q4_K_M, UD-Q4_K_XL, …).",
                                              show_default=False)]
CacheTypeOpt = Annotated[str | None, typer.Option(
    "--cache-type", "-ct", help="KV cache type for K and V (f16, q8_0, q4_0; default: chosen).", show_default=False)]
AllowYarnOpt = Annotated[bool, typer.Option("--allow-yarn", help="Allow context beyond the native length (YaRN).")]

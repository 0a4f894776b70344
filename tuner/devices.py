"""Where llama.cpp puts each buffer: the devices a model loads on, the device of every block and tensor, and the
devices of the MTP sidecar and the vision projector. The bytes are :mod:`tuner.estimate`'s; this module names devices.

Each rule names where llama.cpp implements it (paths relative to its tree, the llama-cpp-python 0.3.36 sdist's
``vendor/llama.cpp``); tests/test_placement.py checks them, and tests/test_multidevice_vs_llama.py against a live
llama-server with RPC devices.

* devices (:func:`model_devices`): ``--device`` picks and orders the model's devices (``none``: no device),
  ``--split-mode none`` keeps only ``--main-gpu``'s, ``row`` and ``tensor`` are refused (llama_prepare_model_devices,
  src/llama.cpp:157-311).
* blocks (:func:`layer_devices`, :func:`slot_devices`): ``-ngl N`` offloads the last N-1 blocks and the output layer;
  the offloaded slots go to the devices at the float32 split points of ``--tensor-split``, else of the devices' free
  memory (src/llama-model.cpp:1579-1614).
* tensors (:func:`tensor_placement`): a tensor lives on its block's device unless a buffer override sends it elsewhere
  (``--n-cpu-moe N`` / ``--cpu-moe``: the expert tensors of the first N / all blocks to the CPU; ``-ot
  PATTERN=BUFFER``: the first rule that matches; common/common.h:1198-1217, common/arg.cpp:252-285,
  llama-model-loader.cpp:1235-1262); ``token_embd`` stays on the CPU, MTP tensors load only when drafting with MTP
  (llama-model.cpp:1589-1614, llama-model-loader.cpp:1114-1290).
* MTP sidecar (:func:`sidecar_placement`, ``-md mtp-*.gguf``): a second model, every tensor placed by the draft's own
  ``-ngld`` (all on the GPUs by default), ``token_embd`` on the CPU, the trunk's ``--n-cpu-moe`` / ``--cpu-moe`` not
  applying to it (common/speculative.cpp:2456-2466).
* vision projector (:func:`projector_device`, ``--mmproj``): the first ``--device`` entry when given
  (common/arg.cpp:889-893), else the first GPU of the backend registry (this machine's, before any RPC worker's;
  tools/mtmd/clip.cpp:188-208), the CPU with ``--no-mmproj-offload`` or ``-dev none``.
"""

from __future__ import annotations

import bisect
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from tuner.errors import TunerError
from tuner.flags import SPEC_MTP, ServerFlags
from tuner.layout import ModelLayout, Tensor, TensorClass
from tuner.untrusted import shown

CPU = "CPU"
#: The longest ``-ot`` pattern tuner takes. llama-server takes any std::regex (common/arg.cpp:265-282); real rules are
#: tens of characters, and the cap keeps a pasted megabyte from being compiled and matched against every tensor.
MAX_OVERRIDE_PATTERN_CHARS = 1000


@dataclass(frozen=True)
class Device:
    """A device llama.cpp offloads to, as the estimate needs it. Strings stand for devices too (:meth:`of`)."""

    name: str  # its buffers' name in llama.cpp's log and -ot targets: CUDA0, RPC0[10.0.0.2:50052]; the memory key
    select_name: str = ""  # its device name (--device, "using device" lines): CUDA0, RPC2; default: name
    cuda: bool = True  # run by the CUDA backend, locally or on an RPC worker: row padding, f16 KV conversion
    remote: bool = False  # behind RPC: no op offload (ggml-rpc.cpp:2262), no host buffer type (ggml-rpc.cpp:2258)

    @property
    def device_name(self) -> str:
        return self.select_name or self.name

    @classmethod
    def of(cls, device: str | Device) -> Device:
        """``CUDA0`` → a local CUDA device; ``RPC0[h:p]`` / ``RPC0`` → a remote device with a CPU backend (pass a
        :class:`Device` with ``cuda=True`` for a CUDA worker); any other name → a local non-CUDA device."""
        if isinstance(device, Device):
            return device
        if device.startswith("RPC"):
            return cls(device, cuda=False, remote=True)
        return cls(device, cuda=device.startswith("CUDA"))


def model_devices(devices: Sequence[str | Device], flags: ServerFlags) -> tuple[Device, ...]:
    """The devices llama.cpp puts the model on, in its order (llama_prepare_model_devices, src/llama.cpp:157-311):
    ``--device`` picks and orders them (``none``: no device), ``--split-mode none`` keeps only ``--main-gpu``'s (an
    index into that list; negative: none). ``--split-mode row`` and ``tensor`` are refused with the reason."""
    all_devices = [Device.of(d) for d in devices]
    if flags.split_mode == "row":
        raise TunerError("--split-mode row does not load in this llama.cpp: CUDA and RPC devices have no split buffer "
                         "type (src/llama-model.cpp:1160-1162); use --split-mode layer")
    if flags.split_mode == "tensor":
        raise TunerError("--split-mode tensor (one experimental meta device, src/llama.cpp:160-221) is not sized by "
                         "tuner; use --split-mode layer or none")
    chosen = all_devices
    if flags.device:
        if [d.lower() for d in flags.device] == ["none"]:
            chosen = []
        else:
            by_name = {n: d for d in all_devices for n in (d.device_name, d.name)}
            unknown = [n for n in flags.device if n not in by_name]
            if unknown:
                known = ", ".join(d.device_name for d in all_devices) or "none"
                raise TunerError(f"--device {','.join(flags.device)}: no device {unknown[0]} here (devices: {known})")
            chosen = [by_name[n] for n in flags.device]
    if flags.split_mode == "none" and chosen:
        if flags.main_gpu < 0:
            return ()
        if flags.main_gpu >= len(chosen):
            raise TunerError(f"--main-gpu {flags.main_gpu}: there are {len(chosen)} device(s) (numbered from 0); "
                             "llama.cpp refuses it (src/llama.cpp:294-296)")
        return (chosen[flags.main_gpu],)
    return tuple(chosen)


def f32(x: float) -> float:
    """``x`` rounded to the nearest float32. An operation on float32 values done in double and rounded so equals the
    float32 operation (53 >= 2 * 24 + 2 bits: double rounding is innocuous for + - * /), which is how the split
    arithmetic below emulates llama.cpp's floats without numpy."""
    return struct.unpack("f", struct.pack("f", x))[0]


def split_points(weights: Sequence[float]) -> list[float]:
    """The cumulative split points llama.cpp computes from ``-ts`` (or the free memory), in float32 as it does
    (src/llama-model.cpp:1579-1587)."""
    acc = 0.0
    cum: list[float] = []
    for w in weights:
        acc = f32(acc + f32(w))
        cum.append(acc)
    if acc <= 0:
        raise TunerError("--tensor-split gives every device a share of 0")
    return [f32(c / acc) for c in cum]


def layer_devices(n_layer_all: int, n_gpu_layers: int | None, gpu_names: Sequence[str],
                  gpu_split: Sequence[float] | None = None) -> list[str]:
    """Device of every block and, last, of the output layer (index ``n_layer_all``), as llama-model.cpp:1589-1614:
    the first ``n_layer_all + 1 - ngl`` slots on the CPU, then slot ``i`` of the ``act`` offloaded ones on the
    device ``upper_bound(split points, float(i) / act)``, in float32. ``gpu_split`` defaults to equal shares.

    With integer shares summing to ``act`` (what tuner plans), device ``d`` holds exactly the next ``n_d`` slots."""
    if not gpu_names:
        return [CPU] * (n_layer_all + 1)
    n_slots = n_layer_all + 1
    ngl = n_slots if n_gpu_layers is None or n_gpu_layers < 0 else n_gpu_layers
    start = max(n_slots - ngl, 0)
    act = min(ngl, n_slots)
    weights = list(gpu_split)[: len(gpu_names)] if gpu_split else []
    weights += [0.0] * (len(gpu_names) - len(weights))
    cum = split_points(weights if any(weights) else [1.0] * len(gpu_names))
    out: list[str] = []
    for il in range(n_slots):
        if il < start or il - start >= act:
            out.append(CPU)
            continue
        frac = f32(f32(il - start) / f32(act))
        out.append(gpu_names[min(bisect.bisect_right(cum, frac), len(gpu_names) - 1)])
    return out


def slot_devices(layout: ModelLayout, flags: ServerFlags, devices: Sequence[str | Device] = (),
                 gpu_split: Sequence[float] | None = None) -> list[str]:
    """:func:`layer_devices` for ``flags``: its model devices (``--device``, ``--split-mode none``), its
    ``--tensor-split`` when any share is not 0 (else ``gpu_split``, llama.cpp's free-memory default), its ``-ngl``."""
    used = model_devices(devices, flags)
    names = [d.name for d in used]
    split: Sequence[float] | None = gpu_split
    if any(flags.tensor_split[: len(used)]):
        split = flags.tensor_split
    elif gpu_split is not None:  # free memory: the shares of the devices kept, in their new order
        index = {Device.of(d).name: i for i, d in enumerate(devices)}
        split = [gpu_split[index[n]] for n in names]
    return layer_devices(layout.n_layer_all, flags.n_gpu_layers, names, split)


def projector_device(devices: Sequence[str | Device], flags: ServerFlags, mmproj_offload: bool = True) -> str:
    """The device llama-server puts the vision projector on (``--mmproj``): the CPU with ``--no-mmproj-offload``;
    else the first ``--device`` entry when ``--device`` is given (common/arg.cpp:889-893; ``none`` leaves it no
    device: the CPU, tools/mtmd/clip.cpp:188-199); else the first GPU the backend registry knows
    (clip.cpp:196-197): this machine's before RPC workers' (registered later); the CPU without a device."""
    all_devices = [Device.of(d) for d in devices]
    if not mmproj_offload or not all_devices:
        return CPU
    if flags.device:  # --device's order, whatever --split-mode none keeps for the model
        chosen = model_devices(all_devices, flags.with_(split_mode="layer", main_gpu=0))
        return chosen[0].name if chosen else CPU
    local = [d.name for d in all_devices if not d.remote]
    return (local or [d.name for d in all_devices])[0]


def override_rules(flags: ServerFlags) -> list[tuple[str, str]]:
    """The ``-ot`` rules of ``flags`` as (regex, buffer type) pairs, checked (``PATTERN=BUFFER_TYPE``)."""
    rules = []
    for rule in flags.override_tensor:
        pattern, _, target = rule.partition("=")
        rules.append((pattern, target))
    return rules


def _compiled_rules(flags: ServerFlags, known: set[str]) -> list[tuple[re.Pattern[str], str]]:
    """The ``-ot`` rules compiled; one-line TunerError for an unknown buffer type, a pattern longer than
    :data:`MAX_OVERRIDE_PATTERN_CHARS` or one Python's ``re`` cannot compile (a syntax error, a repeat count past its
    limit, nesting past the recursion limit)."""
    out = []
    for pattern, target in override_rules(flags):
        rule = shown(f"{pattern}={target}", 60)
        if target not in known:
            raise TunerError(f"-ot {rule}: unknown buffer type {shown(target, 40)} (llama-server knows "
                             f"{', '.join(sorted(known))}; common/arg.cpp:272-278)")
        if len(pattern) > MAX_OVERRIDE_PATTERN_CHARS:
            raise TunerError(f"-ot {rule}: a pattern of {len(pattern)} characters, more than tuner's limit of "
                             f"{MAX_OVERRIDE_PATTERN_CHARS}")
        try:
            out.append((re.compile(pattern), target))
        except (re.error, OverflowError, RecursionError) as error:
            why = "nested too deep" if isinstance(error, RecursionError) else " ".join(str(error).split())[:80]
            raise TunerError(f"-ot {rule}: not a regular expression tuner can use ({why})") from None
    return out


def tensor_placement(layout: ModelLayout, flags: ServerFlags, gpu_names: Sequence[str | Device] = (),
                     gpu_split: Sequence[float] | None = None) -> list[tuple[Tensor, str]]:
    """Every tensor llama-server loads with the device it lands on: its slot's device (:func:`slot_devices`), unless
    a buffer override sends it elsewhere (``--n-cpu-moe N``: the experts of blocks ``0..N-1``; ``--cpu-moe``: every
    expert; ``-ot``: ``CPU`` or a device's buffer type; common/common.h:1198-1217, common/arg.cpp:252-285), the
    input embedding on the CPU (and loaded a second time on the output device when the embeddings are tied), the MTP
    block only when drafting with it (llama-model.cpp:1589-1614, llama-model-loader.cpp:1114-1290)."""
    devs = slot_devices(layout, flags, gpu_names, gpu_split)
    rules = _compiled_rules(flags, {CPU} | {Device.of(d).name for d in gpu_names})
    n_cpu_moe = layout.n_layer_all + 1 if flags.cpu_moe else flags.n_cpu_moe
    out_dev = devs[layout.n_layer_all]
    mtp = flags.spec_type == SPEC_MTP
    placed: list[tuple[Tensor, str]] = []
    for t in layout.tensors:
        if t.cls is TensorClass.MTP and not mtp:
            continue
        # --n-cpu-moe / --cpu-moe come first on tuner's command lines (the table's order), then -ot: the first
        # rule whose pattern regex_searches the name wins (llama-model-loader.cpp:1235-1262)
        target = CPU if n_cpu_moe and t.layer is not None and t.layer < n_cpu_moe and t.is_expert else None
        if target is None and rules:
            target = next((tgt for pattern, tgt in rules if pattern.search(t.name)), None)
        if t.cls is TensorClass.TOKEN_EMBD:
            placed.append((t, target or CPU))
            if layout.tied_embeddings and out_dev != CPU:
                placed.append((t, target or out_dev))
            continue
        placed.append((t, target or (out_dev if t.layer is None else devs[t.layer])))
    return placed


def sidecar_placement(draft: ModelLayout, gpu_names: Sequence[str] = (),
                      gpu_split: Sequence[float] | None = None) -> list[tuple[Tensor, str]]:
    """Every tensor of an MTP sidecar with its device, as the draft model loads it: the draft's ``-ngld`` (all on
    the GPUs by default) and never the trunk's ``--n-cpu-moe`` / ``--cpu-moe`` (common/speculative.cpp:2456-2466),
    ``token_embd`` on the CPU (llama-model.cpp:1603-1605)."""
    devs = layer_devices(draft.n_layer_all, None, gpu_names, gpu_split)
    out_dev = devs[draft.n_layer_all]
    placed: list[tuple[Tensor, str]] = []
    for t in draft.tensors:
        if t.cls is TensorClass.TOKEN_EMBD:
            placed.append((t, CPU))
            if draft.tied_embeddings and out_dev != CPU:
                placed.append((t, out_dev))
            continue
        placed.append((t, out_dev if t.layer is None else devs[t.layer]))
    return placed

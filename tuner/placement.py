"""Where a model goes over several devices: the layer split (``--tensor-split``) and which expert tensors each
device sends to RAM (``--override-tensor``), chosen for llama.cpp's placement rules (:mod:`tuner.devices`).

The planner (:mod:`tuner.planner`) calls :class:`Placer` for two or more devices (one GPU keeps ``--n-cpu-moe``,
which only empties the first device, common/common.h:1202-1217). What it finds, in this order:

1. **the fewest expert tensors in RAM**, every device within its budget (free memory less the planner's buffer);
2. among those, the split that leaves the most room for context: the largest ``min over devices of spare bytes /
   bytes per extra token`` (KV of its attention layers, its mask row); once the context is final (the planner's
   largest, or the model's maximum), the split that reads a generated token's bytes fastest: each device's share of
   the active bytes (weights, the used experts' share, recurrent state) over its memory bandwidth, so the faster card
   takes the layers the slower one need not hold; among placements equal on both, the fewest spills on RPC devices
   (a spilled layer on a worker costs network time per token, :func:`tuner.network.moe_spill_transfers`; one on a
   local device none), found exactly by a second pass with the first pass's context ratio as every device's floor;
3. the command carries the split as integer layer counts, ``-ts n0,n1,…`` summing to ``n_layer_all + 1`` (the
   output layer is the last slot), so llama.cpp's float32 ``upper_bound`` gives device ``d`` exactly its ``n_d``
   slots (src/llama-model.cpp:1556-1614); and one ``-ot`` rule per set of spilled tensor kinds, e.g.
   ``blk\\.(12|13)\\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU``, like llama.cpp's own fit (common/fit.cpp:493-588).

How (:meth:`Placer.place`): per context, a ledger of every slot's bytes on a device (weights with CUDA row padding,
KV, recurrent state) and its expert tensors; a dynamic programme over (device, first slot) that grows each device's
range slot by slot (:class:`~tuner.estimate.BlockSpan` for its compute buffer) and, when a range overflows, spills
its largest expert tensors first (the fewest tensors), the later layers first among equals (each device's boundary
layers, as fit does). It is tried three ways, the first that fits wins:

* no spill and llama.cpp's pipeline parallelism on (it is on whenever there is no tensor override,
  llama-context.cpp:430-457; its 4 copies of every graph input make compute buffers larger);
* no spill and pipeline parallelism off by :data:`NO_PIPELINE_RULE`, an override that matches no tensor;
* spills (their ``-ot`` rules turn pipeline parallelism off too), with the largest expert tensor in the first
  local CUDA device's compute buffer for op offload;
* with every expert in RAM, the fewest leading blocks on the CPU (``-ngl``) as well.

The result is checked with the planner's own estimate (its sidecar, projector and corrections), then
tightened: a spill the check shows unneeded is taken back, one more is added where a device overflows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from tuner.devices import CPU, Device, model_devices, slot_devices, tensor_placement
from tuner.errors import TunerError
from tuner.estimate import (
    RS_ROLLBACK_ARCHS,
    BlockSpan,
    ComputeModel,
    MemoryEstimate,
    context_bytes_by_layer,
    context_shape,
    device_tensor_bytes,
    estimate_memory,
    mtp_compute_bytes,
)
from tuner.flags import FLAGS, MAX_TENSOR_SPLIT, SPEC_MTP, ServerFlags
from tuner.ggml import is_quantized, kv_cache_type
from tuner.hardware import Hardware
from tuner.layout import EXPERT_TENSOR_RE, ModelLayout, Tensor, TensorClass

NO_PIPELINE_RULE = r"^tuner-no-pipeline-parallelism$=CPU"
"""An override that matches no tensor: llama.cpp turns pipeline parallelism off as soon as any override is given
(``has_tensor_overrides``, src/llama-model.cpp:1284, llama-context.cpp:430-435), which saves its 3 extra copies of
every graph input (the KQ mask: ``3 * n_ctx * n_ubatch * 2`` bytes per device and on the host)."""
EXPERT_KINDS = ("up", "down", "gate", "gate_up")
Correction = Callable[[MemoryEstimate], MemoryEstimate]
Estimator = Callable[[ModelLayout, ServerFlags], MemoryEstimate]
FLAG_TS = FLAGS["tensor_split"].long
_INF = float("inf")


_T = TypeVar("_T")


def bisect_fit(bad: int, good: int, probe: Callable[[int], _T | None], good_result: _T) -> _T:
    """Binary search over a monotone fit: ``probe(good)`` fits (its result is ``good_result``), ``probe(bad)``
    does not; the result at the fitting value nearest ``bad`` (``probe`` is called O(log|good - bad|) times).
    Works in either direction: the fewest expert layers in RAM, the most GPU layers, the largest context."""
    while abs(good - bad) > 1:
        mid = (good + bad) // 2
        got = probe(mid)
        if got is not None:
            good, good_result = mid, got
        else:
            bad = mid
    return good_result


def devices_of(hardware: Hardware) -> list[Device]:
    """The hardware's devices as the estimate sees them, in llama.cpp's order (:attr:`Hardware.gpus`): an RPC
    device's ``--device`` name is ``RPC<g>``, numbered across the workers (ggml-rpc.cpp:2353)."""
    out = []
    n_remote = 0
    for g in hardware.gpus:
        select = ""
        if g.is_remote:
            select = f"RPC{n_remote}"
            n_remote += 1
        out.append(Device(g.llama_name, select_name=select, cuda=g.backend == "CUDA", remote=g.is_remote))
    return out


def expert_kind(t: Tensor) -> str:
    m = EXPERT_TENSOR_RE.search(t.name)
    return m.group(1) if m else ""


def spill_rules(tensors: Sequence[Tensor]) -> tuple[str, ...]:
    """``-ot`` rules sending ``tensors`` (experts) to the CPU: one per set of kinds spilled in a layer, the layers
    as an alternation (no commas inside a rule: llama-server splits the value on them, common/arg.cpp:264)."""
    kinds: dict[int, set[str]] = {}
    for t in tensors:
        if t.layer is None:
            continue
        kinds.setdefault(t.layer, set()).add(expert_kind(t))
    groups: dict[tuple[str, ...], list[int]] = {}
    for layer, ks in sorted(kinds.items()):
        groups.setdefault(tuple(k for k in EXPERT_KINDS if k in ks), []).append(layer)
    rules = []
    for ks, layers in groups.items():
        full = set(ks) >= {"up", "down", "gate"} or set(ks) == {"gate_up", "down"}
        which = "(up|down|gate|gate_up)" if full else "(" + "|".join(ks) + ")"
        rules.append(rf"blk\.({'|'.join(str(n) for n in layers)})\.ffn_{which}_(ch|)exps=CPU")
    return tuple(rules)


def cpu_expert_tensors(layout: ModelLayout, flags: ServerFlags, devices: Sequence[str | Device]) -> list[Tensor]:
    """The expert tensors ``flags`` leave in RAM on these devices."""
    return [t for t, dev in tensor_placement(layout, flags, devices) if dev == CPU and t.is_expert]


def cpu_expert_layers(layout: ModelLayout, flags: ServerFlags, devices: Sequence[str | Device]) -> int:
    """How many layers have expert tensors in RAM (``--n-cpu-moe N`` on one GPU: N)."""
    return len({t.layer for t in cpu_expert_tensors(layout, flags, devices) if t.layer is not None})


# ------------------------------------------------------------------------------------------------- the ledger


@dataclass(frozen=True)
class _Ledger:
    """Every slot's bytes on a device (non-expert weights + KV + recurrent state) and its expert tensors, by
    backend (CUDA pads quantized rows), with the compute model of the same flags."""

    n_slots: int
    base: dict[bool, list[int]]  # cuda -> per slot
    experts: dict[bool, list[list[tuple[int, Tensor]]]]  # cuda -> per slot: (bytes, tensor), largest first
    ctx_rate: list[float]  # per slot: device bytes per extra token of context (KV)
    compute: ComputeModel
    mask_rate: float  # bytes of mask per extra token of context, per device with attention
    largest_expert: int
    rest_peak: list[int]  # per trunk block: its FFN / DeltaNet compute peak (ComputeModel.rest_peak)
    is_attention: list[bool]  # per trunk block
    active: list[float]  # per slot: bytes a generated token reads there (weights, active experts, state twice)


_WEIGHTS_CACHE: dict[tuple[int, bool], tuple[ModelLayout, dict, dict, int]] = {}
_WEIGHTS_CACHE_SIZE = 64


def _weights(layout: ModelLayout, mtp: bool) -> tuple[dict[bool, list[int]], dict[bool, list[list]], int]:
    """Per slot, by backend: non-expert weight bytes and the expert tensors (largest first); the largest expert.
    Cached per layout (the planner asks for the same few many times)."""
    key = (id(layout), mtp)
    hit = _WEIGHTS_CACHE.get(key)
    if hit is not None and hit[0] is layout:
        return hit[1], hit[2], hit[3]
    n_slots = layout.n_layer_all + 1
    base = {c: [0] * n_slots for c in (True, False)}
    experts: dict[bool, list[list[tuple[int, Tensor]]]] = {c: [[] for _ in range(n_slots)] for c in (True, False)}
    largest = 0
    for t in layout.tensors:
        if t.cls is TensorClass.MTP and not mtp:
            continue
        if t.cls is TensorClass.TOKEN_EMBD:
            if not layout.tied_embeddings:
                continue  # the input layer is always on the CPU (src/llama-model.cpp:1603-1605)
            slot = layout.n_layer_all  # tied: loaded again with the output layer
        else:
            slot = layout.n_layer_all if t.layer is None else t.layer
        for cuda in (True, False):
            n = device_tensor_bytes(t, Device("x", cuda=cuda))
            if t.is_expert and t.layer is not None:
                experts[cuda][slot].append((n, t))
            else:
                base[cuda][slot] += n
        if t.is_expert:
            largest = max(largest, t.nbytes)
    for cuda in (True, False):
        for slot in experts[cuda]:
            slot.sort(key=lambda nt: (-nt[0], -(nt[1].layer or 0), nt[1].name))
    if len(_WEIGHTS_CACHE) >= _WEIGHTS_CACHE_SIZE:
        _WEIGHTS_CACHE.clear()
    _WEIGHTS_CACHE[key] = (layout, base, experts, largest)
    return base, experts, largest


def _ledger(layout: ModelLayout, flags: ServerFlags) -> _Ledger:
    n_slots = layout.n_layer_all + 1
    weights, experts, largest = _weights(layout, flags.spec_type == SPEC_MTP)
    base = {c: list(weights[c]) for c in (True, False)}
    shape = context_shape(layout, flags)
    rate = [0.0] * n_slots
    if not flags.no_kv_offload:
        for il, (kv, rs) in context_bytes_by_layer(layout, flags).items():
            for cuda in (True, False):
                base[cuda][il] += kv + rs
            rate[il] = kv / shape.n_ctx if shape.n_ctx else 0.0
    tk, tv = kv_cache_type(flags.cache_type_k), kv_cache_type(flags.cache_type_v)
    mtp = flags.spec_type == SPEC_MTP
    flash_attn = flags.flash_attn != "off"
    model = ComputeModel(layout, shape, flash_attn=flash_attn, k_quantized=is_quantized(tk),
                         v_quantized=is_quantized(tv), n_outputs=shape.n_seq * (1 + (flags.spec_draft_n_max if mtp
                                                                                      else 0)),
                         n_rs_seq=flags.spec_draft_n_max if mtp and layout.arch in RS_ROLLBACK_ARCHS else 0)
    if mtp and layout.n_layer < n_slots - 1:  # the draft context's compute buffer, with the MTP block's device
        draft = mtp_compute_bytes(layout, shape, flash_attn, False, shape.n_seq)
        for cuda in (True, False):
            base[cuda][layout.n_layer] += draft
    mask_rate = model.mask / shape.n_ctx if shape.n_ctx else 0.0
    trunk = range(layout.n_layer)
    share = layout.n_expert_used / layout.n_expert if layout.n_expert else 1.0
    active = [float(weights[False][il] + share * sum(n for n, _ in experts[False][il])) for il in range(n_slots)]
    for il, (_, rs) in context_bytes_by_layer(layout, flags).items():
        active[il] += 2 * rs / max(1, shape.n_seq)  # one sequence's state, read and written
    return _Ledger(n_slots, base, experts, rate, model, mask_rate, largest, [model.rest_peak(il) for il in trunk],
                   [il in model.attention for il in trunk], active)


# ---------------------------------------------------------------------------------------------------- search


@dataclass(frozen=True)
class _Mode:
    pipeline: bool  # llama.cpp's pipeline parallelism on (no override at all): no spill allowed
    cpu_slots: int = 0  # leading slots on the CPU (-ngl below all): every expert in RAM
    spill: bool = True  # experts may go to RAM (then the first CUDA device multiplies them: op offload)

    @property
    def spills(self) -> bool:
        return self.spill and not self.pipeline and not self.cpu_slots


@dataclass(frozen=True)
class _Choice:
    counts: tuple[int, ...]  # slots per device
    spills: tuple[int, ...]  # expert tensors in RAM per device
    secondary: float = 0.0  # the search's key after spills: seconds per token (speed), else -(least context ratio)
    least_ratio: float = _INF  # the least over devices of spare bytes / bytes per extra token


@dataclass
class Placement:
    """A placement found: the flags that give it, their estimate, and per device its slots and spilled tensors."""

    flags: ServerFlags
    estimate: MemoryEstimate
    counts: tuple[int, ...]
    spilled: tuple[tuple[Tensor, ...], ...]
    cpu_slots: int = 0
    secondary: float = 0.0

    @property
    def score(self) -> tuple[int, int, float]:
        """Lower is better: blocks on the CPU, expert tensors in RAM, then the search's second key."""
        return self.cpu_slots, self.n_spilled, self.secondary

    @property
    def n_spilled(self) -> int:
        return sum(len(s) for s in self.spilled)


class Placer:
    """Places models on ``devices`` (llama.cpp's order) with ``budgets`` (bytes each may hold) and, when known, their
    memory ``bandwidths``: then also with the devices reordered slowest first (``--device``), so that the fastest
    holds the output layer (the last slot: a generated token reads the whole output matrix); the better of the two
    orders wins (:attr:`Placement.score`). RPC devices keep llama.cpp's order (they come first to save transfers).
    ``local_spills_first``: among the placements equal on spills and context (or speed), the fewest spills on RPC
    devices (off only to compare with the search without that tie-break).

    ``estimate``: the truth a placement is checked with, the planner's own (its MTP sidecar, ``--vision``
    projector and calibration corrections; ``correct`` then only scales the search's compute buffers); by default
    :func:`~tuner.estimate.estimate_memory` on ``devices``, corrected by ``correct``. What it puts on a device beside
    the model's layers (the projector, on the first ``--device`` entry) comes off that device's budget in the search,
    and so does ``reserve_bytes`` (the projector's run-time growth, which no estimate counts) on the device the
    estimate puts the projector on."""

    def __init__(self, devices: Sequence[Device], budgets: Sequence[int],
                 bandwidths: Sequence[float] | None = None, *, local_spills_first: bool = True,
                 estimate: Estimator | None = None, reserve_bytes: int = 0) -> None:
        if len(devices) != len(budgets) or (bandwidths is not None and len(bandwidths) != len(devices)):
            raise ValueError("one budget (and bandwidth) per device")
        if len(devices) > MAX_TENSOR_SPLIT:
            raise TunerError(f"{len(devices)} devices: llama.cpp's --tensor-split takes at most {MAX_TENSOR_SPLIT}")
        self.devices = tuple(devices)
        self.orders = [_Ordered(devices, budgets, bandwidths, natural=devices, local_spills_first=local_spills_first,
                                estimator=estimate, reserve_bytes=reserve_bytes)]
        if bandwidths and len(devices) > 1 and not any(d.remote for d in devices):
            idx = sorted(range(len(devices)), key=lambda i: (bandwidths[i], i))
            if idx != list(range(len(devices))):
                self.orders.append(_Ordered([devices[i] for i in idx], [budgets[i] for i in idx],
                                            [bandwidths[i] for i in idx], natural=devices,
                                            select=tuple(devices[i].device_name for i in idx),
                                            estimator=estimate, reserve_bytes=reserve_bytes))

    def place(self, layout: ModelLayout, flags: ServerFlags, *, max_spills: int | None = None,
              allow_partial: bool = True, speed: bool = False, correct: Correction | None = None
              ) -> Placement | None:
        """The best placement over the device orders (see :meth:`_Ordered.place`), or None if none fits.
        ``correct``: a calibration's corrections of an estimate (compute buffers scaled per device), applied to what
        the search sizes and to the placement's estimate."""
        best: Placement | None = None
        for order in self.orders:
            got = order.place(layout, flags, max_spills=max_spills, allow_partial=allow_partial, speed=speed,
                              correct=correct)
            if got is not None and (best is None or got.score < best.score):
                best = got
        return best


class _Ordered:
    """The search for one device order."""

    def __init__(self, devices: Sequence[Device], budgets: Sequence[int], bandwidths: Sequence[float] | None,
                 natural: Sequence[Device], select: tuple[str, ...] = (), local_spills_first: bool = True,
                 estimator: Estimator | None = None, reserve_bytes: int = 0) -> None:
        self.devices = tuple(devices)
        self.local_spills_first = local_spills_first and any(d.remote for d in devices) and not all(
            d.remote for d in devices)  # only a mix of local and RPC devices has a choice to make
        self.natural = tuple(natural)  # llama.cpp's order: the estimate's device list
        self.budgets = tuple(budgets)
        self.bandwidths = tuple(bandwidths) if bandwidths else None
        self.select = select  # --device, when the order is not llama.cpp's own
        self.first_cuda = next((i for i, d in enumerate(self.devices) if d.cuda and not d.remote), None)
        self.correct: Correction | None = None
        self.compute_scale: list[float] = [1.0] * len(self.devices)
        self.estimator = estimator
        self.reserve_bytes = reserve_bytes
        self.outside: list[int] = [0] * len(self.devices)  # per device: bytes beside the ledger's (the projector)

    def _probe_flags(self, flags: ServerFlags) -> ServerFlags:
        """``flags`` with every device of this order holding layers, no spill."""
        return flags.with_(tensor_split=(1.0,) * len(self.devices), override_tensor=(NO_PIPELINE_RULE,),
                           device=self.select, split_mode="layer", n_cpu_moe=0, cpu_moe=False, n_gpu_layers=None)

    def _estimate(self, layout: ModelLayout, flags: ServerFlags) -> MemoryEstimate:
        """The truth of a placement: the given estimator's, else estimate_memory corrected by ``correct``."""
        if self.estimator is not None:
            return self.estimator(layout, flags)
        est = estimate_memory(layout, flags, self.natural)
        return self.correct(est) if self.correct is not None else est

    def _reserve_on(self, est: MemoryEstimate, dev: Device) -> int:
        """The projector's run-time growth, kept free on the device ``est`` puts the projector on."""
        return self.reserve_bytes if est.vision is not None and est.vision.get("device") == dev.name else 0

    def _outside_bytes(self, layout: ModelLayout, flags: ServerFlags) -> list[int]:
        """Bytes each device holds beside the model's slots, which the ledger leaves out: what the estimator adds
        to the plain estimate outside compute buffers (the ``--vision`` projector on its device; an MTP sidecar's
        tensors, approximately: they follow the split) and the projector's reserve."""
        if self.estimator is None:
            return [0] * len(self.devices)
        probe = self._probe_flags(flags)
        full, plain = self.estimator(layout, probe), estimate_memory(layout, probe, self.natural)
        out = []
        for d in self.devices:
            a, b = full.device(d.name), plain.device(d.name)
            out.append(a.total_bytes - a.compute_bytes - (b.total_bytes - b.compute_bytes)
                       + self._reserve_on(full, d))
        return out

    def _compute_scales(self, layout: ModelLayout, flags: ServerFlags, correct: Correction | None) -> list[float]:
        """Each device's compute-buffer factor under ``correct`` (a calibration scales each device's buffer by its
        own factor), read off one estimate with every device holding layers."""
        if correct is None:
            return [1.0] * len(self.devices)
        raw = estimate_memory(layout, self._probe_flags(flags), self.natural)
        fixed = correct(raw)
        out = []
        for d in self.devices:
            before = raw.device(d.name).compute_bytes
            out.append(fixed.device(d.name).compute_bytes / before if before else 1.0)
        return out

    # --- one mode --------------------------------------------------------------------------------------------
    def _solve(self, led: _Ledger, mode: _Mode, max_spills: int | None, speed: bool = False) -> _Choice | None:
        """The split with the fewest spills, then the most room for context (``speed``: the least time per token,
        each device's share of the active bytes over its bandwidth), then the fewest spills on RPC devices, in
        ``mode``; None if none fits.

        A spill on an RPC device costs network time per token (:func:`tuner.network.moe_spill_transfers`), one on
        a local device none. The context key is a least ratio over the devices (a bottleneck), so a tie-break after
        it is not exact in one pass (a suffix that loses on its own ratio may tie once a tighter device comes
        before it). So the first pass finds the best spills and ratio (or time); when that puts spills on RPC
        devices and a local device exists, a second pass asks every device for at least that ratio (a per-device
        bound, exact in the programme) and minimises (spills, time, RPC-device spills): the same spills, time and
        ratio, the fewest of them on the network."""
        first = self._dp(led, mode, max_spills, speed)
        if first is None or not self.local_spills_first or not any(
                n for n, d in zip(first.spills, self.devices, strict=True) if d.remote):
            return first
        again = self._dp(led, mode, max_spills, speed, ratio_floor=first.least_ratio)
        return first if again is None else _Choice(again.counts, again.spills, first.secondary, first.least_ratio)

    def _dp(self, led: _Ledger, mode: _Mode, max_spills: int | None, speed: bool,
            ratio_floor: float | None = None) -> _Choice | None:
        """The programme of :meth:`_solve`: with ``ratio_floor`` None, the key is (spills, seconds per token or 0,
        -(least context ratio), RPC-device spills); else every device must leave at least ``ratio_floor`` and the
        key is (spills, seconds per token or 0, RPC-device spills, -(least context ratio))."""
        by_speed = speed and self.bandwidths is not None
        n_dev, n_slots = len(self.devices), led.n_slots
        model = led.compute
        n_trunk = model.layout.n_layer
        spill_ok = mode.spills
        offload = led.largest_expert if (spill_ok or mode.cpu_slots) and model.op_offload else 0
        rpc_key = 3 if ratio_floor is None else 2  # where the RPC-device spills sit in an entry
        ratio_key = 5 - rpc_key
        neg_floor = _INF if ratio_floor is None else -ratio_floor
        # best[d][s]: the best entry for devices d.. holding slots s..n_slots-1:
        # (spills, seconds per token (speed) or 0, then -(least context ratio) and RPC-device spills, end slot)
        best: list[list[tuple[float, float, float, float, int] | None]] = [
            [None] * (n_slots + 1) for _ in range(n_dev + 1)]
        best[n_dev][n_slots] = (0, 0.0, -_INF, 0, n_slots) if rpc_key == 3 else (0, 0.0, 0, -_INF, n_slots)
        for d in range(n_dev - 1, -1, -1):
            dev = self.devices[d]
            base, experts = led.base[dev.cuda], led.experts[dev.cuda]
            budget = self.budgets[d] - self.outside[d]
            op = offload if d == self.first_cuda else 0
            bandwidth = self.bandwidths[d] if by_speed and self.bandwidths else 1.0
            scale = self.compute_scale[d]
            starts = range(mode.cpu_slots, mode.cpu_slots + 1) if d == 0 else range(mode.cpu_slots, n_slots + 1)
            for s in starts:
                span = BlockSpan()
                base_sum = exp_sum = 0
                rate = 0.0
                read = 0.0
                sizes: dict[int, int] = {}
                top: tuple[float, float, float, float, int] | None = None
                for e in range(s, n_slots + 1):
                    if e > s:  # grow the range by slot e - 1
                        il = e - 1
                        if il < n_trunk:
                            span.add(led.rest_peak[il], led.is_attention[il])
                        base_sum += base[il]
                        rate += led.ctx_rate[il]
                        read += led.active[il]
                        if not mode.cpu_slots:  # with -ngl below all, every expert is in RAM (--cpu-moe)
                            for n, _ in experts[il]:
                                exp_sum += n
                                sizes[n] = sizes.get(n, 0) + 1
                    rest = best[d + 1][e]
                    if rest is None and d < n_dev - 1 and e < n_slots:
                        continue
                    compute = int(scale * model.device_bytes(span, e == n_slots and e > s, dev,
                                                             op_offload_bytes=op, pipeline=mode.pipeline,
                                                             partial_first=bool(mode.cpu_slots)))
                    over = base_sum + exp_sum + compute - budget
                    if over - (exp_sum if spill_ok else 0) > 0:
                        break  # what cannot be spilled already overflows: more slots only add to it
                    if rest is None:
                        continue
                    if over <= 0:
                        k, slack = 0, -over
                    elif not spill_ok:
                        continue
                    else:
                        got, freed = _spill_count(sizes, over)
                        if got is None:
                            continue
                        k, slack = got, freed - over
                    total = k + rest[0]
                    if max_spills is not None and total > max_spills:
                        continue
                    grow = rate + (led.mask_rate * (4 if mode.pipeline else 1) if span.attn else 0.0)
                    ratio = slack / grow if grow > 0 else _INF
                    if -ratio > neg_floor:
                        continue  # the second pass: this device would leave less room than the best plan's
                    seconds = read / bandwidth + rest[1] if by_speed else 0.0
                    neg_ratio = max(-ratio, rest[ratio_key])
                    rpc = (k if dev.remote else 0) + rest[rpc_key]
                    cand = ((total, seconds, neg_ratio, rpc, e) if rpc_key == 3
                            else (total, seconds, rpc, neg_ratio, e))
                    if top is None or _better(cand, top):
                        top = cand
                best[d][s] = top
        if best[0][mode.cpu_slots] is None:
            return None
        counts, spills = [], []
        s = mode.cpu_slots
        for d in range(n_dev):
            entry = best[d][s]
            assert entry is not None
            e = entry[4]
            after = best[d + 1][e]
            counts.append(e - s)
            spills.append(int(entry[0] - (after[0] if after else 0)))
            s = e
        top_entry = best[0][mode.cpu_slots]
        assert top_entry is not None
        least = -top_entry[ratio_key]
        return _Choice(tuple(counts), tuple(spills), top_entry[1] if by_speed else -least, least)

    # --- the flags of a choice -------------------------------------------------------------------------------
    def _realise(self, layout: ModelLayout, flags: ServerFlags, led: _Ledger, choice: _Choice, mode: _Mode,
                 spills: Sequence[int] | None = None) -> Placement:
        spills = list(choice.spills if spills is None else spills)
        spilled: list[tuple[Tensor, ...]] = []
        s = mode.cpu_slots
        for d, n in enumerate(choice.counts):
            if mode.cpu_slots:
                spilled.append(())
            else:
                pool = sorted((nt for il in range(s, s + n) for nt in led.experts[self.devices[d].cuda][il]),
                              key=lambda nt: (-nt[0], -(nt[1].layer or 0), nt[1].name))
                spilled.append(tuple(t for _, t in pool[: spills[d]]))
            s += n
        rules = spill_rules([t for ts in spilled for t in ts])
        if not mode.pipeline and not rules and not mode.cpu_slots and len(self.devices) > 1:
            rules = (NO_PIPELINE_RULE,)
        shares = tuple(float(n) for n in choice.counts)
        new = flags.with_(tensor_split=shares, override_tensor=rules, n_cpu_moe=0, cpu_moe=bool(mode.cpu_slots),
                          n_gpu_layers=led.n_slots - mode.cpu_slots if mode.cpu_slots else None,
                          split_mode="layer", device=self.select, main_gpu=0)
        est = self._estimate(layout, new)
        return Placement(new, est, choice.counts, tuple(spilled), mode.cpu_slots, choice.secondary)

    def _overflow(self, est: MemoryEstimate) -> list[int]:
        return [est.device(dev.name).total_bytes + self._reserve_on(est, dev) - b
                for dev, b in zip(self.devices, self.budgets, strict=True)]

    def _checked(self, layout: ModelLayout, flags: ServerFlags, led: _Ledger, choice: _Choice,
                 mode: _Mode) -> Placement | None:
        """The choice as flags, checked with the estimate: a device over budget spills one more tensor (if it may),
        a spill that is not needed is taken back."""
        spills = list(choice.spills)
        place = self._realise(layout, flags, led, choice, mode, spills)
        spill_ok = mode.spills
        for _ in range(4 * len(self.devices) + 8):
            over = self._overflow(place.estimate)
            bad = [d for d, o in enumerate(over) if o > 0]
            if not bad:
                break
            if not spill_ok:
                return None
            d = bad[0]
            s = sum(choice.counts[:d]) + mode.cpu_slots
            have = sum(len(led.experts[self.devices[d].cuda][il]) for il in range(s, s + choice.counts[d]))
            if spills[d] >= have:
                return None
            spills[d] += 1
            place = self._realise(layout, flags, led, choice, mode, spills)
        else:
            return None
        if spill_ok:  # take back what the check shows is not needed
            for d in range(len(self.devices)):
                while spills[d] > 0:
                    trial = spills.copy()
                    trial[d] -= 1
                    cand = self._realise(layout, flags, led, choice, mode, trial)
                    if any(o > 0 for o in self._overflow(cand.estimate)):
                        break
                    spills, place = trial, cand
        return place

    # --- entry points ----------------------------------------------------------------------------------------
    def place(self, layout: ModelLayout, flags: ServerFlags, *, max_spills: int | None = None,
              allow_partial: bool = True, speed: bool = False, correct: Correction | None = None
              ) -> Placement | None:
        """The placement of ``layout`` at ``flags``'s context with the fewest expert tensors in RAM (at most
        ``max_spills``), then the most room for context — or, with ``speed`` (for a context that is final), the
        fewest seconds per token: more layers on the faster cards; None if nothing fits (with ``allow_partial``,
        leading blocks go to the CPU as a last resort)."""
        pipeline_possible = len(self.devices) > 1 and not flags.no_kv_offload
        led = _ledger(layout, flags)
        self.correct = correct
        self.compute_scale = self._compute_scales(layout, flags, correct)
        self.outside = self._outside_bytes(layout, flags)
        modes = (_Mode(True, spill=False), _Mode(False, spill=False)) if pipeline_possible else ()
        for mode in (*modes, _Mode(False)):
            choice = self._solve(led, mode, max_spills, speed)
            if choice is not None:
                got = self._checked(layout, flags, led, choice, mode)
                if got is not None and (max_spills is None or got.n_spilled <= max_spills):
                    return got
        if not allow_partial or (max_spills is not None and max_spills < _n_experts(layout)):
            return None
        return self._partial(layout, flags, led)

    def _partial(self, layout: ModelLayout, flags: ServerFlags, led: _Ledger) -> Placement | None:
        """Every expert in RAM and the fewest leading slots on the CPU that fit (binary search)."""
        def probe(cpu_slots: int) -> Placement | None:
            mode = _Mode(False, cpu_slots)
            choice = self._solve(led, mode, None)
            return None if choice is None else self._checked(layout, flags, led, choice, mode)

        # 0 does not fit (tried above, with spills); n_slots: every slot on the CPU (-ngl 0)
        all_on_cpu = probe(led.n_slots)
        if all_on_cpu is None:  # not even the CPU's share of the compute buffers on the devices
            return None
        return bisect_fit(0, led.n_slots, probe, all_on_cpu)


def _better(a: tuple[float, float, float, float, int], b: tuple[float, float, float, float, int]) -> bool:
    """Fewer spills; then (speed) fewer seconds per token, sums within a relative 1e-9 counting as equal (a split of
    the same bytes over equally fast devices); then the two keys after (:meth:`_Ordered._dp`), lower first; on a
    full tie the first found (the shorter range) stays."""
    if a[0] != b[0]:
        return a[0] < b[0]
    if abs(a[1] - b[1]) > 1e-9 * max(abs(a[1]), abs(b[1])):
        return a[1] < b[1]
    return (a[2], a[3]) < (b[2], b[3])


def _n_experts(layout: ModelLayout) -> int:
    return sum(1 for t in layout.tensors if t.is_expert and t.cls is not TensorClass.MTP)


def _spill_count(sizes: dict[int, int], over: int) -> tuple[int | None, int]:
    """The fewest tensors (largest first) whose bytes reach ``over``, and the bytes they free; None if all do not."""
    k, freed = 0, 0
    for size in sorted(sizes, reverse=True):
        if freed >= over:
            break
        take = min(sizes[size], math.ceil((over - freed) / size))
        k += take
        freed += take * size
    return (k, freed) if freed >= over else (None, freed)


@dataclass(frozen=True)
class DeviceShare:
    """What one device holds in a plan: its slots (blocks; the output layer), its expert tensors sent to RAM, the
    bytes the estimate puts on it, and its budget when known."""

    name: str
    used: bool  # a model device (--device, --split-mode none may leave it out)
    slots: int
    blocks: tuple[int, ...]
    output_layer: bool
    expert_tensors_in_ram: int
    expert_layers_in_ram: tuple[int, ...]
    total_bytes: int
    budget_bytes: int | None = None

    def to_dict(self) -> dict[str, object]:
        return {"name": self.name, "used": self.used, "slots": self.slots, "blocks": list(self.blocks),
                "output_layer": self.output_layer, "expert_tensors_in_ram": self.expert_tensors_in_ram,
                "expert_layers_in_ram": list(self.expert_layers_in_ram), "total_bytes": self.total_bytes,
                "budget_bytes": self.budget_bytes}


def describe(layout: ModelLayout, flags: ServerFlags, devices: Sequence[Device],
             budgets: Sequence[int] | None = None, estimate: MemoryEstimate | None = None) -> list[DeviceShare]:
    """Each device's share of a plan (:class:`DeviceShare`): the model's devices in their order (``--device``'s when
    given, the order of ``--tensor-split``), then any it leaves out; bytes from ``estimate`` (the plan's, with its
    projector and sidecar), else the plain estimate."""
    used = model_devices(devices, flags)
    placed = tensor_placement(layout, flags, devices)
    est = estimate if estimate is not None else estimate_memory(layout, flags, devices)
    slots = slot_devices(layout, flags, devices)
    budget_of = dict(zip((d.name for d in devices), budgets, strict=True)) if budgets is not None else {}
    out: list[DeviceShare] = []
    for dev in [*used, *(d for d in devices if d not in used)]:
        mine = [il for il, name in enumerate(slots) if name == dev.name]
        spilled = [t for t, where in placed
                   if where == CPU and t.is_expert and t.layer is not None and slots[t.layer] == dev.name]
        out.append(DeviceShare(
            name=dev.name, used=dev in used, slots=len(mine),
            blocks=tuple(il for il in mine if il < layout.n_layer_all),
            output_layer=layout.n_layer_all in mine, expert_tensors_in_ram=len(spilled),
            expert_layers_in_ram=tuple(sorted({t.layer for t in spilled if t.layer is not None})),
            total_bytes=est.device(dev.name).total_bytes, budget_bytes=budget_of.get(dev.name)))
    return out


def placement_reason(layout: ModelLayout, flags: ServerFlags, devices: Sequence[Device], floor: int) -> str:
    """One line for a plan's reasons: the split and what each device sends to RAM."""
    rows = describe(layout, flags, devices)
    n = sum(r.expert_tensors_in_ram for r in rows)
    split = (FLAG_TS + " " + ",".join(f"{v:g}" for v in flags.tensor_split) if flags.tensor_split
             else "the default split")
    per = "; ".join(f"{r.name} {r.slots} layers"
                    + (f" ({r.expert_tensors_in_ram} expert tensors in RAM)" if r.expert_tensors_in_ram else "")
                    + (" with the output layer" if r.output_layer else "") for r in rows if r.used)
    if any(r.used and not r.slots for r in rows):
        per += " (a device left empty: the faster cards hold every layer, which reads a token fastest)"
    what = (f"{n} expert tensors in RAM, the fewest that fit {floor} tokens of context on every device"
            if n else "every expert on the GPUs")
    pipeline = (" (llama.cpp's pipeline parallelism, whose input copies take more memory)"
                if not flags.override_tensor else "")
    off = (" (an override that matches nothing turns llama.cpp's pipeline parallelism off, saving its larger "
           "compute buffers for context)" if NO_PIPELINE_RULE in flags.override_tensor else "")
    return f"{split}: {what}: {per}{pipeline}{off}; KV and recurrent state stay with their layers"

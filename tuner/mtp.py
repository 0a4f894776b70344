"""MTP speculative decoding (``--spec-type draft-mtp``): what one drafting step costs, and so whether it pays.

With MTP, llama-server's draft context runs the model's own multi-token-prediction head (one extra block, in the
GGUF or in an ``mtp-*.gguf`` sidecar) ``n`` times to draft ``n`` tokens (``--spec-draft-n-max``), then the trunk
verifies them in one batch of ``1 + n`` tokens and keeps the accepted prefix (common/speculative.cpp,
tools/server/server-context.cpp:3034, 3961). Per step, with ``p`` the chance that a drafted token is accepted given
that the ones before it were::

    tokens(step) = 1 + p + p² + … + pⁿ
    time(step)   = verify(1 + n) + n · draft

* ``verify(k)``: one trunk pass over ``k`` tokens. It reads the weights once, as a token does, except the routed
  experts: ``k`` tokens route to up to ``E · (1 - (1 - u/E)^k)`` distinct experts per layer instead of ``u``
  (uniform routing), read at the same bandwidth. Everything else (dense weights, KV, recurrent state, the per-layer
  fixed cost) is paid once, the latter times ``1 +`` :data:`VERIFY_LAYER_OVERHEAD` (a batch of several tokens
  runs other, slower kernels than a single token's). With experts in RAM those extra experts come over the RAM
  bandwidth: that is why MTP is planned only with the whole trunk on the GPU.
* ``draft``: one pass of the head: its block's weights (its experts at the active fraction), the output matrix
  (``n_vocab × n_embd``, the draft samples from full logits, common/speculative.cpp:1405-1416), one layer's fixed
  cost.

The terms come from :mod:`tuner.speed` (the same fitted bandwidth efficiency and per-layer cost), and the result
scales the plain prediction (or the measured speed, when the profile has one) by ``time(token) · tokens(step) /
time(step)``. ``p`` is :data:`MTP_ACCEPTANCE` unless given: the acceptance published runs report for Qwen3.6-35B-A3B
is 0.62 to 0.94 (tests/data/speed-measurements.yaml, the ``mtp: true`` records); a measured rate (``tuner bench``'s
``draft_acceptance``) is better.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from tuner.devices import CPU, slot_devices, tensor_placement
from tuner.flags import SPEC_MTP, ServerFlags
from tuner.hardware import Hardware
from tuner.layout import ModelLayout, TensorClass
from tuner.placement import Device, cpu_expert_layers, devices_of
from tuner.speed import (
    CPU_LAYER_SECONDS,
    GPU_TG_BANDWIDTH_EFFICIENCY,
    PLANNING_DEPTH_TOKENS,
    RAM_EFFICIENCY,
    Prediction,
    gpu_generation,
    gpu_layer_seconds,
    speed_terms,
    tg_parts,
)

MTP_ACCEPTANCE = 0.8
"""Chance that a drafted token is accepted (given the earlier ones were), assumed without a measurement."""
VERIFY_LAYER_OVERHEAD = 0.2813
"""Extra fixed per-layer cost of the verify pass, as a fraction of a single token's (dimensionless). Fitted on 1
record, which alone sets it: Qwen3.6-35B-A3B Q4_K_M on an RTX 4090, ``--spec-draft-n-max 1`` at 87.18 % acceptance,
213.87 tok/s (tests/data/speed-measurements.yaml, id 37), against :mod:`tuner.speed`'s plain prediction for it
(:func:`fit_verify_layer_overhead`; tests/test_mtp.py re-derives it, so a re-fitted speed model asks for a new one)."""
DRAFT_LENGTHS: tuple[int, ...] = (1, 2, 3)
"""``--spec-draft-n-max`` values the planner tries (llama.cpp's default is 3; uploaders of MTP GGUFs advise 2)."""


@dataclass(frozen=True)
class StepCost:
    """One MTP step in seconds, from :mod:`tuner.speed`'s terms: the plain token, the verify pass, one draft pass."""

    token_s: float  # one plain token
    verify_s: float  # the trunk over 1 + n_max tokens
    draft_s: float  # one pass of the head
    tokens: float  # expected tokens per step
    n_max: int

    @property
    def step_s(self) -> float:
        return self.verify_s + self.draft_s * self.n_max

    @property
    def speedup(self) -> float:
        """Tokens per second with MTP over tokens per second without."""
        return self.tokens * self.token_s / self.step_s if self.step_s else 0.0


def expected_tokens(n_max: int, acceptance: float) -> float:
    """Tokens a step yields: the verified one plus the accepted prefix of ``n_max`` drafts."""
    return 1.0 + sum(acceptance ** i for i in range(1, n_max + 1))


def distinct_experts(n_expert: int, n_used: int, n_tokens: int) -> float:
    """Experts ``n_tokens`` tokens route to in one layer, under uniform routing."""
    if not n_expert:
        return 0.0
    return n_expert * (1.0 - (1.0 - n_used / n_expert) ** n_tokens)


def _bandwidth(dev: str, hardware: Hardware) -> float:
    """Bytes per second generation streams weights at on ``dev`` (fitted efficiency included)."""
    if dev == CPU:
        return hardware.ram_bandwidth_bytes_s * RAM_EFFICIENCY
    gpu = next(g for g in hardware.gpus if g.llama_name == dev)
    return gpu.mem_bandwidth_bytes_s * GPU_TG_BANDWIDTH_EFFICIENCY


def step_cost(layout: ModelLayout, flags: ServerFlags, hardware: Hardware, *, draft: ModelLayout | None = None,
              acceptance: float = MTP_ACCEPTANCE, gpu_split: Sequence[float] | None = None,
              depth_tokens: int = PLANNING_DEPTH_TOKENS) -> StepCost:
    """The cost of one step drafting ``flags.spec_draft_n_max`` tokens (see the module docstring)."""
    n_max = max(flags.spec_draft_n_max, 0)
    plain = flags.with_(spec_type=None)
    parts = tg_parts(speed_terms(layout, plain, hardware, gpu_split=gpu_split, depth_tokens=depth_tokens))
    token_s = sum(parts.values())
    layers_s = sum(v for k, v in parts.items() if k.startswith(("GPU_LAYER_SECONDS", "CPU_LAYER_SECONDS")))

    active = layout.n_expert_used / layout.n_expert if layout.n_expert else 1.0
    expert_s = 0.0  # seconds of one token's routed experts
    for t, dev in tensor_placement(layout, plain, devices_of(hardware), gpu_split):
        if t.is_expert and t.cls is not TensorClass.MTP:
            expert_s += t.nbytes * active / _bandwidth(dev, hardware)
    extra = distinct_experts(layout.n_expert, layout.n_expert_used, 1 + n_max) / max(layout.n_expert_used, 1) - 1
    verify_s = token_s + expert_s * max(extra, 0.0) + layers_s * VERIFY_LAYER_OVERHEAD

    head = draft if draft is not None else layout
    # the head drafts where the output layer is (the last slot): the last device of --device's order, not NVML's
    head_dev = slot_devices(layout, plain, devices_of(hardware), gpu_split)[layout.n_layer_all]
    head_bytes = 0.0
    for t in head.tensors:
        if t.cls is TensorClass.MTP or (t.cls is TensorClass.OUTPUT and t.layer is None):
            head_bytes += t.nbytes * (active if t.is_expert else 1.0)
        elif t.cls is TensorClass.TOKEN_EMBD and head.tied_embeddings:
            head_bytes += t.nbytes
    if head_dev != CPU:
        gen = gpu_generation(next(g for g in hardware.gpus if g.llama_name == head_dev).compute_capability) or "?"
        layer_s = gpu_layer_seconds(gen)[0]
    else:
        layer_s = CPU_LAYER_SECONDS
    draft_s = head_bytes / _bandwidth(head_dev, hardware) + layer_s
    return StepCost(token_s, verify_s, draft_s, expected_tokens(n_max, acceptance), n_max)


def fit_verify_layer_overhead(layout: ModelLayout, flags: ServerFlags, hardware: Hardware, measured_tg_tok_s: float,
                              acceptance: float, depth_tokens: int) -> float:
    """The :data:`VERIFY_LAYER_OVERHEAD` that makes the step model give ``measured_tg_tok_s`` for ``flags`` (which
    draft) on ``hardware``: the time per step the measurement implies, less the modelled parts, over the plain
    token's per-layer fixed cost."""
    plain = flags.with_(spec_type=None)
    parts = tg_parts(speed_terms(layout, plain, hardware, depth_tokens=depth_tokens))
    layers_s = sum(v for k, v in parts.items() if k.startswith(("GPU_LAYER_SECONDS", "CPU_LAYER_SECONDS")))
    cost = step_cost(layout, flags, hardware, acceptance=acceptance, depth_tokens=depth_tokens)
    plain_tg = 1.0 / cost.token_s
    step_s = cost.tokens / measured_tg_tok_s * (plain_tg * cost.token_s)
    modelled_s = cost.step_s - layers_s * VERIFY_LAYER_OVERHEAD
    return (step_s - modelled_s) / layers_s


def predict_mtp(layout: ModelLayout, flags: ServerFlags, hardware: Hardware, plain: Prediction, *,
                draft: ModelLayout | None = None, acceptance: float = MTP_ACCEPTANCE,
                gpu_split: Sequence[float] | None = None,
                depth_tokens: int = PLANNING_DEPTH_TOKENS) -> Prediction:
    """Generation speed with MTP drafting: ``plain`` (the prediction or measurement without it) times the step
    model's speed-up. Prompt processing is unchanged."""
    cost = step_cost(layout, flags, hardware, draft=draft, acceptance=acceptance, gpu_split=gpu_split,
                     depth_tokens=depth_tokens)
    tg = plain.tg_tok_s * cost.speedup
    note = (f"MTP drafting {flags.spec_draft_n_max} token(s) a step at an assumed acceptance of {acceptance:.2f}: "
            f"{cost.tokens:.2f} tokens per step, ×{cost.speedup:.2f} over plain decoding")
    notes = (*(n for n in plain.notes if "speculative" not in n), note)
    return replace(plain, tg_tok_s=tg, efficiency=tg / plain.tg_bound_tok_s if plain.tg_bound_tok_s else 0.0,
                   source=plain.source if plain.source == "measured" else "roofline+mtp", notes=notes)


def mtp_flags(flags: ServerFlags, n_max: int) -> ServerFlags:
    return flags.with_(spec_type=SPEC_MTP, spec_draft_n_max=n_max)


def drafting_blocked(layout: ModelLayout, flags: ServerFlags, devices: Sequence[str | Device], *,
                     vision: bool = False) -> str | None:
    """Why MTP drafting would not be planned for ``layout`` with ``flags`` on ``devices`` (the GPUs, in llama.cpp's
    order; none = CPU only) whatever head it had, by the rules :meth:`tuner.planner._Search.try_mtp` plans it by: a
    GPU, one slot, no vision projector, every layer and every expert on the GPU (with experts in RAM, verifying
    ``1 + n`` tokens reads up to ``1 + n`` times the routed experts from RAM). None when drafting could be planned
    (it still has to fit and pay)."""
    if not devices:
        return "no GPU: drafting on the CPU costs about what it saves"
    if flags.n_seq > 1:
        return f"--parallel {flags.n_seq}: MTP drafting is planned for one slot"
    if vision:
        return "--vision: MTP is not planned together with the vision projector"
    if flags.n_gpu_layers is not None and 0 <= flags.n_gpu_layers <= layout.n_layer_all:
        return f"{layout.n_layer_all + 1 - flags.n_gpu_layers} layer(s) on the CPU"
    in_ram = cpu_expert_layers(layout, flags, devices) if layout.is_moe else 0
    if in_ram:
        return (f"experts of {in_ram} layer(s) in RAM: verifying the drafted tokens reads more of them from RAM "
                "than drafting saves")
    return None


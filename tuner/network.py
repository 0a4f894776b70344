"""What crosses the network when layers run on RPC workers: bytes each way and blocking round trips, per generated
token and per prompt ubatch. :mod:`tuner.speed` turns them into seconds over a :class:`~tuner.hardware.NetworkLink`.

How llama.cpp moves data between devices (ggml/src/ggml-backend.cpp:1662-1810, the RPC client in
ggml/src/ggml-rpc/ggml-rpc.cpp; byte counts of its messages, checked with a protocol-parsing proxy between a CPU
llama-server and two CPU workers):

* The graph runs as splits, one per run of consecutive nodes on one device, in layer order: the input embedding on
  the host (CPU), each block on its layer's device, the output layer on the device of the last slot, the logits read
  back by the host. A block whose expert tensors stay in host RAM runs those expert matmuls on the host (or, for a
  ubatch of 32 tokens or more, on the first local GPU: op offload never picks an RPC device, which has no
  ``offload_op``, ggml-rpc.cpp:2262): see :func:`moe_spill_transfers` for what that costs on an RPC device.
* A boundary into an RPC device from the host or a local GPU is a ``SET_TENSOR`` (request: 9 B header + 296 B
  tensor + 9 B + payload, no reply); out of an RPC device, a ``GET_TENSOR`` (321 B up, the payload back, one blocking
  round trip); between two workers both; between two devices of one worker a server-side ``COPY_TENSOR`` (one round
  trip, no payload). The payload is the f32 hidden state, ``4 * n_embd`` bytes per token.
* Every RPC device also receives the graph inputs it uses, one ``SET_TENSOR`` each: with attention layers the KQ mask
  (``n_kv * n_tok``, f16 with flash attention, f32 without; it dominates at long context), the positions (4 i32 per
  token with M-RoPE) and the K and V row indices (i64 per token); with DeltaNet layers ``s_copy`` (i32 per sequence);
  the output device ``out_ids``. ``n_kv`` is the used cells rounded up to 256 (src/llama-kv-cache.cpp:1260-1274).
* If the output layer is on an RPC device, the logits (``4 * n_vocab`` per output row) come back over the network.
* A graph is sent whole (``GRAPH_COMPUTE``, about :data:`GRAPH_BYTES_PER_BLOCK` per block, and about
  :data:`ALLOC_SIZE_ROUND_TRIPS` ``GET_ALLOC_SIZE`` round trips per device for new tensor shapes) whenever it changes:
  every ubatch in prompt processing, every 256 tokens in generation (when ``n_kv`` grows a step,
  src/llama-context.cpp:1412); otherwise a 13-byte ``GRAPH_RECOMPUTE``.

* A device whose blocks a spill cuts in two or more splits sends every split's graph whole on every run: the RPC
  backend remembers one graph per device (``last_graph_uid``, ggml-rpc.cpp:1044-1050) and the splits alternate; and
  a split's serialized graph carries every tensor its nodes reach through their sources (``add_tensor`` recurses,
  ggml-rpc.cpp:990-1008), the device's earlier blocks too (measured: 95,893 + 141,349 B per token for a 5-block device
  cut at block 2, against one 160,565 B graph every 256 tokens uncut).

Not counted: context checkpoints (each pulls the recurrent state held by RPC devices back to the host, a few per
prompt), several sequences decoding at once (every payload times the sequences), the model load (every RPC-resident
weight sent once).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuner.devices import CPU, Device, layer_devices, tensor_placement
from tuner.estimate import MROPE_ARCHS, OP_OFFLOAD_MIN_BATCH, ServerFlags, pad
from tuner.layout import EXPERT_TENSOR_RE, ModelLayout

SET_OVERHEAD_BYTES = 314
"""``SET_TENSOR`` request beside its payload: 1 B command, 8 B size, a 296 B serialized tensor, 8 B offset, 1 B."""
GET_REQUEST_BYTES = 321
"""``GET_TENSOR`` request (header, serialized tensor, offset and size); the reply is an 8 B size and the payload."""
GET_REPLY_OVERHEAD_BYTES = 8
COPY_REQUEST_BYTES = 9 + 2 * 296
"""``COPY_TENSOR`` within one worker: two serialized tensors; the reply is one byte (and its 8 B size)."""
RECOMPUTE_BYTES = 13
GRAPH_BYTES_PER_BLOCK = 32_000
"""Serialized graph of one block (``8 * n_nodes + 296 * n_tensors``): 160,565 B measured for 5 qwen35moe blocks; the
node count per block does not depend on the model's width."""
ALLOC_SIZE_ROUND_TRIPS = 20
"""``GET_ALLOC_SIZE`` round trips per RPC device for a graph of new shapes (measured, cached by shape)."""
ALLOC_SIZE_BYTES = 330
GRAPH_REUSE_TOKENS = 256
"""Generation rebuilds (and resends) the graph when ``n_kv`` grows by a 256-cell step."""


@dataclass(frozen=True)
class Traffic:
    """Bytes each way and blocking round trips of one graph run (a generated token, or a prompt ubatch)."""

    bytes_up: float = 0.0  # this machine -> workers
    bytes_down: float = 0.0  # workers -> this machine
    round_trips: float = 0.0
    boundaries: int = 0  # device boundaries with an RPC device on one side

    @property
    def bytes_total(self) -> float:
        return self.bytes_up + self.bytes_down

    def seconds(self, payload_bytes_s: float, rtt_s: float) -> float:
        """All serial with compute: every round trip waits, every byte crosses the link."""
        return self.round_trips * rtt_s + self.bytes_total / payload_bytes_s

    def to_dict(self) -> dict[str, Any]:
        return {"bytes_up": round(self.bytes_up), "bytes_down": round(self.bytes_down),
                "round_trips": round(self.round_trips, 2), "boundaries": self.boundaries}


def moe_spill_transfers(layout: ModelLayout, on_host: frozenset[str], n_tok: int) -> tuple[list[int], list[int]]:
    """What one MoE block on an RPC device moves over the network when the expert tensors of ``on_host`` (kinds
    ``up``, ``gate``, ``down``, ``gate_up``) stay in the head's RAM: the payloads it reads back (one ``GET_TENSOR``,
    one blocking round trip, each) and those it sends (one ``SET_TENSOR`` each), for a ubatch of ``n_tok`` tokens.

    From ``build_moe_ffn`` (src/llama-graph.cpp:2007-2360) and the scheduler (ggml/src/ggml-backend.cpp:1087-1420):
    the router, the top-k ``selected_experts`` and their weights run on the layer's device (weights there); each
    expert matmul (``ggml_mul_mat_id``) runs where its weight is (pass 1, :961-981); the activation between them
    follows its neighbours (pass 2: a device expands down from a node it runs and up from the next one it runs,
    :1124-1170, the CPU only where nothing else claims a node); the weighting ``experts * weights`` and the sum over
    the ``n_expert_used`` experts land on the device, expanded up from the shared expert's matmuls that follow them
    (src/models/qwen35moe.cpp:499-541). So the host needs the tensors its nodes read from the device, each copied
    once per graph (:1363-1392): the normed input ``[n_embd, n_tok]`` for an up/gate matmul, ``par`` (the SwiGLU
    output ``[n_ff_exp, n_expert_used, n_tok]`` f32) for a down matmul whose SwiGLU stayed on the device, and the
    ``selected_experts`` view, ``4 * n_expert_used + (n_tok - 1) * 4 * n_expert`` bytes (a view of the argsort of
    all experts, ggml.c:5450-5464, copied by ``ggml_nbytes``, ggml.c:1298-1320); and the device gets back what it
    reads from the host: the down matmul's ``experts`` ``[n_embd, n_expert_used, n_tok]`` f32 (160 KiB per token for
    the 397B), or an up/gate output when the SwiGLU runs on the device. Measured per generated token with two CPU
    workers (width 256, 8 experts, 2 used, ``n_ff_exp`` 32): a down-only spill 2 GETs of 256 + 8 B and one SET of
    2,048 B; a whole-layer spill 2 GETs of 1,024 + 8 B and the same SET."""
    e, x, f, n = layout.n_embd, max(layout.n_expert_used, 1), layout.n_ff_exp, max(layout.n_expert, 1)
    size = {"cur": 4 * e * n_tok, "ids": 4 * x + (n_tok - 1) * 4 * n, "up": 4 * f * x * n_tok,
            "gate": 4 * f * x * n_tok, "par": 4 * f * x * n_tok, "experts": 4 * e * x * n_tok,
            # the two halves of the merged gate_up output, strided views read by the SwiGLU
            "gate_half": 4 * f + (x * n_tok - 1) * 8 * f, "up_half": 4 * f + (x * n_tok - 1) * 8 * f}
    # (node, on the host?, tensors it reads): the nodes of build_moe_ffn in graph order
    if layout_has_gate_up(layout):
        last_mm = "gate_up" in on_host
        nodes = [("gate_up", last_mm, ("cur", "ids"))]
        swiglu_reads: tuple[str, ...] = ("gate_half", "up_half")
        made = {"gate_half": last_mm, "up_half": last_mm}
    else:
        last_mm = "gate" in on_host
        nodes = [("up", "up" in on_host, ("cur", "ids")), ("gate", last_mm, ("cur", "ids"))]
        swiglu_reads = ("gate", "up")
        made = {"up": "up" in on_host, "gate": last_mm}
    down_host = "down" in on_host
    # the SwiGLU: expanded down from a gate matmul on the device, else up from a down matmul there, else the host
    swiglu_host = last_mm and down_host
    nodes += [("swiglu", swiglu_host, swiglu_reads), ("down", down_host, ("par", "ids")),
              ("weighted", False, ("experts",))]
    made |= {"cur": False, "ids": False, "par": swiglu_host, "experts": down_host}
    gets: list[int] = []
    sets: list[int] = []
    copied: set[tuple[str, bool]] = set()  # one copy of a tensor per backend per graph
    for _, host, reads in nodes:
        for name in reads:
            if made[name] != host and (name, host) not in copied:
                copied.add((name, host))
                (gets if host else sets).append(size[name])
    return gets, sets


def layout_has_gate_up(layout: ModelLayout) -> bool:
    """Whether the model's experts use the merged ``ffn_gate_up_exps`` tensor."""
    return any(t.is_expert and ".ffn_gate_up_exps" in t.name for t in layout.tensors)


def _stations(layout: ModelLayout, flags: ServerFlags, gpu_names: Sequence[str],
              gpu_split: Sequence[float] | None) -> tuple[list[str], dict[str, set[int]], dict[int, frozenset[str]]]:
    """The devices one token's hidden state visits in order (host first and last), the blocks per device, and per
    block whose experts (some of them) stay in host RAM the kinds that do."""
    devs = layer_devices(layout.n_layer_all, flags.n_gpu_layers, gpu_names, gpu_split)
    on_host: dict[int, set[str]] = {}
    for t, dev in tensor_placement(layout, flags, gpu_names, gpu_split):
        if t.is_expert and dev == CPU and t.layer is not None and t.layer < layout.n_layer:
            m = EXPERT_TENSOR_RE.search(t.name)
            if m:
                on_host.setdefault(t.layer, set()).add(m.group(1))
    path = [CPU]
    blocks: dict[str, set[int]] = {}
    for il in range(layout.n_layer):
        dev = devs[il]
        blocks.setdefault(dev, set()).add(il)
        path.append(dev)
    path += [devs[layout.n_layer_all], CPU]
    spilled = {il: frozenset(ks) for il, ks in on_host.items() if devs[il] != CPU}
    return path, blocks, spilled


def rpc_traffic(layout: ModelLayout, flags: ServerFlags, gpu_names: Sequence[str],
                gpu_split: Sequence[float] | None, endpoints: Mapping[str, str], *, n_tok: int, n_kv: int,
                n_outputs: int = 1, new_graph: float = 1.0) -> Traffic:
    """What one graph run of ``n_tok`` tokens against ``n_kv`` KV cells sends over the network (see the module
    docstring). ``endpoints``: the RPC devices among ``gpu_names``, each with its worker's ``host:port``;
    ``new_graph``: the share of runs that send a new graph (1 for a prompt ubatch, 1/256 in generation)."""
    if not endpoints:
        return Traffic()
    path, blocks, spilled = _stations(layout, flags, gpu_names, gpu_split)
    hidden = 4 * layout.n_embd * n_tok
    up = down = trips = 0.0
    boundaries = 0
    out_dev = path[-2]
    for i, (a, b) in enumerate(itertools.pairwise(path)):
        if a == b or (a not in endpoints and b not in endpoints):
            continue
        boundaries += 1
        last = i == len(path) - 2  # the output layer to the host: logits instead of the hidden state
        payload = 4 * layout.n_vocab * n_outputs if last else hidden
        if a in endpoints and b in endpoints and endpoints[a] == endpoints[b]:
            up += COPY_REQUEST_BYTES
            down += GET_REPLY_OVERHEAD_BYTES + 1
            trips += 1
            continue
        if a in endpoints:
            up += GET_REQUEST_BYTES
            down += GET_REPLY_OVERHEAD_BYTES + payload
            trips += 1
        if b in endpoints:
            up += SET_OVERHEAD_BYTES + payload
    # op offload: the first local CUDA device multiplies host-resident experts for a large ubatch and reads the
    # selected experts from their device once more before its inputs are copied (ggml-backend.cpp:1714-1745)
    offload = n_tok >= OP_OFFLOAD_MIN_BATCH and any(
        Device.of(g).cuda and g not in endpoints for g in gpu_names)
    splits: dict[str, int] = {}
    for il, kinds in sorted(spilled.items()):
        dev = path[1 + il]
        if dev not in endpoints:
            continue
        boundaries += 2
        gets, sets = moe_spill_transfers(layout, kinds, n_tok)
        if offload:
            gets.append(4 * max(layout.n_expert_used, 1) + (n_tok - 1) * 4 * max(layout.n_expert, 1))
        up += len(gets) * GET_REQUEST_BYTES + sum(SET_OVERHEAD_BYTES + p for p in sets)
        down += sum(GET_REPLY_OVERHEAD_BYTES + p for p in gets)
        trips += len(gets)
        splits[dev] = splits.get(dev, 0) + 1
    attention, recurrent = set(layout.attention_layers), set(layout.recurrent_layers)
    mask = n_kv * n_tok * (2 if flags.flash_attn != "off" else 4)
    positions = 4 * (4 if layout.arch in MROPE_ARCHS else 1) * n_tok
    for dev in endpoints:
        mine = blocks.get(dev, set())
        if not mine and dev != out_dev:
            continue
        inputs = []
        if mine & attention:
            inputs += [mask, positions, 8 * n_tok, 8 * n_tok]
        if mine & recurrent:
            inputs.append(4)  # s_copy: one i32 per sequence in the ubatch, one sequence here
        if dev == out_dev:
            inputs.append(4 * n_outputs)
        up += sum(SET_OVERHEAD_BYTES + p for p in inputs)
        graph = GRAPH_BYTES_PER_BLOCK * _split_graph_blocks(sorted(mine), [il for il in spilled if il in mine])
        if dev in splits:  # cut by spills: every split's graph, every run
            up += graph
        else:
            up += RECOMPUTE_BYTES + new_graph * graph
        up += new_graph * ALLOC_SIZE_ROUND_TRIPS * ALLOC_SIZE_BYTES
        down += new_graph * ALLOC_SIZE_ROUND_TRIPS * 16
        trips += new_graph * ALLOC_SIZE_ROUND_TRIPS
    return Traffic(up, down, trips, boundaries)


def _split_graph_blocks(blocks: Sequence[int], cuts: Sequence[int]) -> int:
    """Blocks' worth of serialized graph a device sends for one run: one graph of its blocks (at least one: the
    output layer alone), or, cut by spills at ``cuts``, each split's graph reaching back to the device's first block
    (ggml-rpc.cpp:990-1008): the blocks up to and including the cut, and all of them for the last split."""
    n = max(len(blocks), 1)
    if not cuts:
        return n
    first = blocks[0]
    return sum(il - first + 1 for il in sorted(set(cuts))) + n


@dataclass(frozen=True)
class NetworkTerm:
    """The network's share of a prediction: traffic per generated token and per prompt ubatch, and their seconds per
    token over the link."""

    link: Mapping[str, float]
    tg: Traffic
    pp_ubatch: Traffic
    n_ubatch: int
    n_kv_tg: int
    tg_s: float  # seconds per generated token
    pp_s: float  # seconds per prompt token

    def to_dict(self) -> dict[str, Any]:
        return {"link": dict(self.link), "tg_per_token": self.tg.to_dict(), "pp_per_ubatch": self.pp_ubatch.to_dict(),
                "n_ubatch": self.n_ubatch, "n_kv_tg": self.n_kv_tg, "tg_ms_per_token": round(self.tg_s * 1e3, 3),
                "pp_ms_per_token": round(self.pp_s * 1e3, 4)}


def network_term(layout: ModelLayout, flags: ServerFlags, gpu_names: Sequence[str],
                 gpu_split: Sequence[float] | None, endpoints: Mapping[str, str], *, depth_tokens: int,
                 n_ctx_kv: int, n_ubatch: int, payload_bytes_s: float, rtt_s: float,
                 link: Mapping[str, float] | None = None) -> NetworkTerm | None:
    """The network term at ``depth_tokens`` of context (None without RPC devices): one generated token against the
    cells used so far, and a prompt ubatch of ``n_ubatch`` tokens (its logits: one row, the last prompt token)."""
    if not endpoints:
        return None
    n_kv_tg = min(pad(depth_tokens + 1, 256), n_ctx_kv)
    n_kv_pp = min(pad(depth_tokens + n_ubatch, 256), n_ctx_kv)
    tg = rpc_traffic(layout, flags, gpu_names, gpu_split, endpoints, n_tok=1, n_kv=n_kv_tg,
                     new_graph=1 / GRAPH_REUSE_TOKENS)
    pp = rpc_traffic(layout, flags, gpu_names, gpu_split, endpoints, n_tok=n_ubatch, n_kv=n_kv_pp)
    return NetworkTerm(link=dict(link or {}), tg=tg, pp_ubatch=pp, n_ubatch=n_ubatch, n_kv_tg=n_kv_tg,
                       tg_s=tg.seconds(payload_bytes_s, rtt_s),
                       pp_s=pp.seconds(payload_bytes_s, rtt_s) / max(n_ubatch, 1))

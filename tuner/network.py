"""What crosses the network when layers run on RPC workers: bytes each way and blocking round trips, per generated
token and per prompt ubatch. :mod:`tuner.speed` turns them into seconds over a :class:`~tuner.hardware.NetworkLink`.

How llama.cpp moves data between devices (ggml/src/ggml-backend.cpp:1662-1810, the RPC client in
ggml/src/ggml-rpc/ggml-rpc.cpp; byte counts of its messages, checked with a protocol-parsing proxy between a CPU
llama-server and two CPU workers):

* The graph runs as splits, one per run of consecutive nodes on one device, in layer order: the input embedding on
  the host (CPU), each block on its layer's device, the output layer on the device of the last slot, the logits read
  back by the host. A block whose expert tensors stay in host RAM runs its expert matmuls on the host (or, for a
  ubatch of 32 tokens or more, on the first local GPU: op offload never picks an RPC device, which has no
  ``offload_op``, ggml-rpc.cpp:2262): two more boundaries.
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

Not counted: context checkpoints (each pulls the recurrent state held by RPC devices back to the host, a few per
prompt), several sequences decoding at once (every payload times the sequences), the model load (every RPC-resident
weight sent once).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tuner.estimate import CPU, MROPE_ARCHS, ServerFlags, layer_devices, pad, tensor_placement
from tuner.layout import ModelLayout

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


def _stations(layout: ModelLayout, flags: ServerFlags, gpu_names: Sequence[str],
              gpu_split: Sequence[float] | None) -> tuple[list[str], dict[str, set[int]]]:
    """The devices one token's hidden state visits in order (host first and last), and the blocks per device."""
    devs = layer_devices(layout.n_layer_all, flags.n_gpu_layers, gpu_names, gpu_split)
    expert_on_host = {t.layer for t, dev in tensor_placement(layout, flags, gpu_names, gpu_split)
                      if t.is_expert and dev == CPU and t.layer is not None}
    path = [CPU]
    blocks: dict[str, set[int]] = {}
    for il in range(layout.n_layer):
        dev = devs[il]
        blocks.setdefault(dev, set()).add(il)
        path.append(dev)
        if dev != CPU and il in expert_on_host:
            path += [CPU, dev]
    path += [devs[layout.n_layer_all], CPU]
    return path, blocks


def rpc_traffic(layout: ModelLayout, flags: ServerFlags, gpu_names: Sequence[str],
                gpu_split: Sequence[float] | None, endpoints: Mapping[str, str], *, n_tok: int, n_kv: int,
                n_outputs: int = 1, new_graph: float = 1.0) -> Traffic:
    """What one graph run of ``n_tok`` tokens against ``n_kv`` KV cells sends over the network (see the module
    docstring). ``endpoints``: the RPC devices among ``gpu_names``, each with its worker's ``host:port``;
    ``new_graph``: the share of runs that send a new graph (1 for a prompt ubatch, 1/256 in generation)."""
    if not endpoints:
        return Traffic()
    path, blocks = _stations(layout, flags, gpu_names, gpu_split)
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
        up += sum(SET_OVERHEAD_BYTES + p for p in inputs) + RECOMPUTE_BYTES
        up += new_graph * (GRAPH_BYTES_PER_BLOCK * max(len(mine), 1) + ALLOC_SIZE_ROUND_TRIPS * ALLOC_SIZE_BYTES)
        down += new_graph * ALLOC_SIZE_ROUND_TRIPS * 16
        trips += new_graph * ALLOC_SIZE_ROUND_TRIPS
    return Traffic(up, down, trips, boundaries)


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

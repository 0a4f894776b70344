"""The memory estimate as pure arithmetic on real GGUF layouts (sparse files with the published Qwen3.5 shapes).

The reference figures are llama-server's own reported buffers, written out in the tests below: CPU runs on a sparse
35B-A3B file, a worked single-H100 example and expert offload. The live comparison with llama-server itself is
tests/test_estimate_vs_llama.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.devices import CPU, layer_devices
from tuner.errors import TunerError
from tuner.estimate import ServerFlags, activation_peaks, context_shape, estimate_memory, mtp_compute_bytes
from tuner.layout import ModelLayout, TensorClass
from tuner.models import local_layout
from tuner.synth import SynthSpec, qwen35_35b_a3b_spec, real_vocab_overrides, write_synthetic_gguf
from tuner.units import MiB

GPU = ("CUDA0",)


def q4_k_m_like(name: str, role: str) -> str:
    """The synthetic quant mix of the worked single-H100 example: Q4_K experts and embedding, Q8_0 other matrices,
    Q6_K output, f32 router and 1-D tensors."""
    return {"norm": "f32", "router": "f32", "experts": "q4_K", "embd": "q4_K", "output": "q6_K"}.get(role, "q8_0")


@pytest.fixture(scope="module")
def a3b(tmp_path_factory: pytest.TempPathFactory) -> ModelLayout:
    """Qwen3.5-35B-A3B with the MTP block, the real vocabulary and the section-9 quant mix (sparse, ~20 GB)."""
    spec = qwen35_35b_a3b_spec(mtp=True, **real_vocab_overrides())
    path = write_synthetic_gguf(tmp_path_factory.mktemp("est") / "a3b.gguf", spec, type_for=q4_k_m_like)[0]
    return local_layout(path)


@pytest.fixture(scope="module")
def a3b_122b_like(tmp_path_factory: pytest.TempPathFactory) -> ModelLayout:
    """The 8-layer 122B-A10B-like shape of appendix B (n_embd 3072, n_ff_exp 1024, 64 V heads, 32 heads)."""
    spec = qwen35_35b_a3b_spec(n_layer=8, n_embd=3072, n_head=32, n_ff_exp=1024, n_ff_shexp=1024, ssm_dt_rank=64)
    return local_layout(write_synthetic_gguf(tmp_path_factory.mktemp("est") / "122b.gguf", spec)[0])


def mib(n_bytes: int) -> float:
    return n_bytes / MiB


# ------------------------------------------------------------------------------- appendix B: CPU llama-server runs

# (tag, flags, n_ctx, n_ctx_seq, KV MiB, RS MiB, compute MiB, output MiB) exactly as the appendix lists them.
APPENDIX_B: list[tuple[str, dict[str, object], int, int, float, float, float, float]] = [
    ("c8k", {"ctx_size": 8192, "parallel": 1}, 8192, 8192, 160, 62.81, 80.02, 0.95),
    ("c32k", {"ctx_size": 32768, "parallel": 1}, 32768, 32768, 640, 62.81, 104.02, 0.95),
    ("c128k", {"ctx_size": 131072, "parallel": 1}, 131072, 131072, 2560, 62.81, 200.02, 0.95),
    ("c256k", {"ctx_size": 262144, "parallel": 1}, 262144, 262144, 5120, 62.81, 328.02, 0.95),
    ("c32k_ub256", {"ctx_size": 32768, "parallel": 1, "ubatch_size": 256}, 32768, 32768, 640, 62.81, 52.01, 0.95),
    ("c32k_ub1024", {"ctx_size": 32768, "parallel": 1, "ubatch_size": 1024}, 32768, 32768, 640, 62.81, 208.04,
     0.95),
    ("c32k_ub2048", {"ctx_size": 32768, "parallel": 1, "ubatch_size": 2048}, 32768, 32768, 640, 62.81, 416.07,
     0.95),
    ("c32k_ub4096", {"ctx_size": 32768, "parallel": 1, "ubatch_size": 4096, "batch_size": 4096}, 32768, 32768,
     640, 62.81, 832.14, 0.95),
    ("c32k_np4_nokvu", {"ctx_size": 32768, "parallel": 4, "kv_unified": False}, 32768, 8192, 640, 251.25, 80.02,
     3.79),
    ("c32k_np4_kvu", {"ctx_size": 32768, "parallel": 4, "kv_unified": True}, 32768, 32768, 640, 251.25, 104.02,
     3.79),
    ("c32k_npauto", {"ctx_size": 32768}, 32768, 32768, 640, 251.25, 104.02, 3.79),
    ("c32k_faoff", {"ctx_size": 32768, "parallel": 1, "flash_attn": "off"}, 32768, 32768, 640, 62.81, 1130.01,
     0.95),
    ("c8k_faoff", {"ctx_size": 8192, "parallel": 1, "flash_attn": "off"}, 8192, 8192, 160, 62.81, 314.01, 0.95),
    ("c32k_q8", {"ctx_size": 32768, "parallel": 1, "cache_type_k": "q8_0", "cache_type_v": "q8_0"}, 32768, 32768,
     340, 62.81, 104.28, 0.95),
    ("c32k_q4", {"ctx_size": 32768, "parallel": 1, "cache_type_k": "q4_0", "cache_type_v": "q4_0"}, 32768, 32768,
     180, 62.81, 104.28, 0.95),
    ("c32k_iq4nl", {"ctx_size": 32768, "parallel": 1, "cache_type_k": "iq4_nl", "cache_type_v": "iq4_nl"}, 32768,
     32768, 180, 62.81, 104.28, 0.95),
    ("c32k_q5_1", {"ctx_size": 32768, "parallel": 1, "cache_type_k": "q5_1", "cache_type_v": "q5_1"}, 32768, 32768,
     240, 62.81, 104.28, 0.95),
    ("c32k_bf16", {"ctx_size": 32768, "parallel": 1, "cache_type_k": "bf16", "cache_type_v": "bf16"}, 32768, 32768,
     640, 62.81, 104.02, 0.95),
    ("c32k_q8k_faoff", {"ctx_size": 32768, "parallel": 1, "cache_type_k": "q8_0", "flash_attn": "off"}, 32768,
     32768, 490, 62.81, 1138.26, 0.95),
    ("c256k_np4_kvu_q8", {"ctx_size": 262144, "parallel": 4, "kv_unified": True, "cache_type_k": "q8_0",
                          "cache_type_v": "q8_0"}, 262144, 262144, 2720, 251.25, 328.28, 3.79),
    ("c256k_np4_nokvu", {"ctx_size": 262144, "parallel": 4, "kv_unified": False}, 262144, 65536, 5120, 251.25,
     136.02, 3.79),
    ("c256k_ub2048_q8", {"ctx_size": 262144, "parallel": 1, "ubatch_size": 2048, "cache_type_k": "q8_0",
                         "cache_type_v": "q8_0"}, 262144, 262144, 2720, 62.81, 1312.34, 0.95),
    ("pad_c10000_np3", {"ctx_size": 10000, "parallel": 3, "kv_unified": False}, 10752, 3584, 210, 188.44, 75.67,
     2.84),
    ("pad_c10000_np3_kvu", {"ctx_size": 10000, "parallel": 3, "kv_unified": True}, 10240, 10240, 200, 188.44, 82.18,
     2.84),
    ("default_fit", {"ctx_size": 160512}, 160512, 160512, 3135, 251.25, 228.77, 3.79),
]


@pytest.mark.parametrize(("tag", "flags", "n_ctx", "n_ctx_seq", "kv", "rs", "compute", "output"), APPENDIX_B,
                         ids=[row[0] for row in APPENDIX_B])
def test_appendix_b_cpu_runs_are_reproduced(a3b: ModelLayout, tag: str, flags: dict[str, object], n_ctx: int,
                                            n_ctx_seq: int, kv: float, rs: float, compute: float,
                                            output: float) -> None:
    est = estimate_memory(a3b, ServerFlags(**flags))  # type: ignore[arg-type]
    assert (est.n_ctx, est.n_ctx_seq) == (n_ctx, n_ctx_seq)
    assert mib(est.kv_bytes) == pytest.approx(kv, abs=0.5)
    assert mib(est.recurrent_bytes) == pytest.approx(rs, abs=0.005)
    assert mib(est.output_bytes) == pytest.approx(output, abs=0.005)
    assert mib(est.host.compute_bytes) == pytest.approx(compute, abs=0.1)
    assert mib(est.host.weights_bytes) == pytest.approx(mib(a3b.weights_bytes))


def test_appendix_b_mtp_runs_add_the_draft_context(a3b: ModelLayout) -> None:
    # mtp_on_c32k: KV 640 (+64 MTP ctx), RS 251.25 (rs_seq 3), compute 104.02 (+76 MTP ctx), output 0.95
    est = estimate_memory(a3b, ServerFlags(ctx_size=32768, parallel=1, spec_type="draft-mtp"))
    assert mib(est.kv_bytes) == pytest.approx(640 + 64)
    assert mib(est.recurrent_bytes) == pytest.approx(251.25, abs=0.005)
    assert mib(est.compute_bytes) == pytest.approx(104.02 + 76, abs=0.1)
    # mtp_on_c32k_np4 (-kvu): RS 1005, compute 136.39 (+76): the snapshot term of the DeltaNet block is fitted
    est4 = estimate_memory(a3b, ServerFlags(ctx_size=32768, parallel=4, kv_unified=True, spec_type="draft-mtp"))
    assert mib(est4.recurrent_bytes) == pytest.approx(1005.0, abs=0.005)
    assert mib(est4.compute_bytes) == pytest.approx(136.39 + 76, rel=0.10)
    # the MTP weights are loaded only for drafting (+473 MiB at this quant mix)
    assert 400 < mib(est.weights_bytes - estimate_memory(a3b, ServerFlags(ctx_size=32768)).weights_bytes) < 550


@pytest.mark.parametrize(("flags", "compute"), [({}, 128.02), ({"ubatch_size": 1024}, 256.04),
                                                ({"flash_attn": "off"}, 602.01)])
def test_appendix_b_122b_like_shape(a3b_122b_like: ModelLayout, flags: dict[str, object], compute: float) -> None:
    est = estimate_memory(a3b_122b_like, ServerFlags(ctx_size=8192, parallel=1, **flags))  # type: ignore[arg-type]
    assert mib(est.kv_bytes) == pytest.approx(32)
    assert mib(est.recurrent_bytes) == pytest.approx(24.84, abs=0.005)
    assert mib(est.compute_bytes) == pytest.approx(compute, abs=0.1)


# ------------------------------------------------------------------------------- section 9: single H100, full offload


@pytest.mark.parametrize(("flags", "kv", "rs", "gpu_compute", "gpu_self", "host_compute", "host_output"), [
    ({"parallel": 1}, 5120.0, 62.81, 328, 24701, 260, 0.95),
    ({}, 5120.0, 251.25, 328, 24890, 260, 3.79),
    ({"parallel": 4, "kv_unified": False}, 5120.0, 251.25, 136, 24698, 68, 3.79),
    ({"parallel": 1, "cache_type_k": "q8_0", "cache_type_v": "q8_0"}, 2720.0, 62.81, 840, 22813, 260, 0.95),
    ({"parallel": 4, "kv_unified": True, "cache_type_k": "q8_0", "cache_type_v": "q8_0"}, 2720.0, 251.25, 840,
     23002, 260, 3.79),
    ({"parallel": 4, "kv_unified": False, "cache_type_k": "q8_0", "cache_type_v": "q8_0"}, 2720.0, 251.25, 648,
     22810, 68, 3.79),
])
def test_section_9_worked_example(a3b: ModelLayout, flags: dict[str, object], kv: float, rs: float,
                                  gpu_compute: float, gpu_self: float, host_compute: float,
                                  host_output: float) -> None:
    est = estimate_memory(a3b, ServerFlags(ctx_size=262_144, **flags), GPU)  # type: ignore[arg-type]
    gpu = est.device("CUDA0")
    assert round(mib(gpu.weights_bytes)) == 19_190
    assert round(mib(est.host.weights_bytes)) == 273  # token_embd stays on the CPU
    assert mib(gpu.kv_bytes) == kv
    assert mib(gpu.recurrent_bytes) == pytest.approx(rs, abs=0.005)
    assert round(mib(gpu.compute_bytes)) == gpu_compute
    assert round(mib(gpu.total_bytes)) == gpu_self
    assert round(mib(est.host.compute_bytes)) == host_compute
    assert mib(est.host.output_bytes) == pytest.approx(host_output, abs=0.005)


def test_section_5_expert_offload(a3b: ModelLayout) -> None:
    q8 = {"ctx_size": 262_144, "parallel": 1, "cache_type_k": "q8_0", "cache_type_v": "q8_0"}
    experts_per_layer = a3b.expert_bytes_by_layer()
    assert round(mib(experts_per_layer[0])) == 432
    n_cpu_moe = estimate_memory(a3b, ServerFlags(n_cpu_moe=20, **q8), GPU)  # type: ignore[arg-type]
    assert round(mib(n_cpu_moe.device("CUDA0").weights_bytes)) == 10_550
    assert round(mib(n_cpu_moe.host.weights_bytes)) == 273 + 20 * 432
    all_cpu = estimate_memory(a3b, ServerFlags(cpu_moe=True, **q8), GPU)  # type: ignore[arg-type]
    assert round(mib(all_cpu.device("CUDA0").weights_bytes)) == 1_910
    # op offload copies the largest CPU-resident expert tensor into the GPU's compute buffer (ffn_up_exps, 144 MiB)
    full = estimate_memory(a3b, ServerFlags(**q8), GPU)  # type: ignore[arg-type]
    assert mib(all_cpu.device("CUDA0").compute_bytes - full.device("CUDA0").compute_bytes) == pytest.approx(144)
    # the section's "about 14.3 / 5.7" are thousands of MiB: 14 317 and 5 677 MiB
    assert round(mib(n_cpu_moe.device("CUDA0").total_bytes)) == 14_317
    assert round(mib(all_cpu.device("CUDA0").total_bytes)) == 5_677


# ------------------------------------------------------------------------------- placement rules


def test_partial_ngl_offloads_the_last_layers_and_the_output(a3b: ModelLayout) -> None:
    devs = layer_devices(a3b.n_layer_all, 11, GPU)
    assert devs[-1] == "CUDA0"  # output layer
    assert devs[: a3b.n_layer_all + 1 - 11] == [CPU] * (a3b.n_layer_all + 1 - 11)
    assert devs[a3b.n_layer_all + 1 - 11:] == ["CUDA0"] * 11
    est = estimate_memory(a3b, ServerFlags(ctx_size=8192, parallel=1, n_gpu_layers=11), GPU)
    on_gpu = {t.layer for t in a3b.tensors if t.layer is not None and devs[t.layer] == "CUDA0"}
    expected_gpu = sum(t.nbytes for t in a3b.tensors
                       if t.cls is not TensorClass.MTP and (t.layer in on_gpu or t.cls is TensorClass.OUTPUT
                                                            or t.name == "output_norm.weight"))
    assert est.device("CUDA0").weights_bytes == expected_gpu
    assert est.weights_bytes == a3b.weights_bytes
    # KV and recurrent state follow their layers: attention layers 31, 35 and 39 are on the GPU (41 blocks incl. MTP)
    assert est.device("CUDA0").kv_bytes == 3 * 8192 * a3b.kv_bytes_per_cell("f16", "f16", [3])
    assert est.host.kv_bytes == 7 * 8192 * a3b.kv_bytes_per_cell("f16", "f16", [3])
    assert est.device("CUDA0").recurrent_bytes + est.host.recurrent_bytes == a3b.recurrent_bytes_per_seq()
    assert est.host.compute_bytes > 0 and est.device("CUDA0").compute_bytes > 0


def test_ngl_zero_keeps_everything_on_the_cpu(a3b: ModelLayout) -> None:
    est = estimate_memory(a3b, ServerFlags(ctx_size=8192, parallel=1, n_gpu_layers=0), GPU)
    gpu = est.device("CUDA0")
    assert (gpu.weights_bytes, gpu.kv_bytes, gpu.recurrent_bytes, gpu.compute_bytes) == (0, 0, 0, 0)
    assert est.host.weights_bytes == a3b.weights_bytes
    assert est.n_gpu_layers == 0


def test_n_cpu_moe_moves_the_experts_of_the_first_layers(a3b: ModelLayout) -> None:
    base = estimate_memory(a3b, ServerFlags(ctx_size=8192, parallel=1), GPU)
    moved = estimate_memory(a3b, ServerFlags(ctx_size=8192, parallel=1, n_cpu_moe=3), GPU)
    first3 = sum(b for layer, b in a3b.expert_bytes_by_layer().items() if layer < 3)
    assert base.device("CUDA0").weights_bytes - moved.device("CUDA0").weights_bytes == first3
    assert moved.host.weights_bytes - base.host.weights_bytes == first3
    everything = estimate_memory(a3b, ServerFlags(ctx_size=8192, parallel=1, cpu_moe=True), GPU)
    trunk_experts = sum(b for layer, b in a3b.expert_bytes_by_layer().items() if layer < a3b.n_layer)
    assert everything.host.weights_bytes - base.host.weights_bytes == trunk_experts
    # routers and shared experts stay on the GPU
    assert everything.device("CUDA0").weights_bytes >= a3b.bytes_by_class()[TensorClass.SHARED_EXPERT]


def test_token_embd_stays_on_the_cpu_and_tied_output_is_duplicated(tmp_path: Path) -> None:
    tied = local_layout(write_synthetic_gguf(tmp_path / "tied.gguf", SynthSpec(tie_embeddings=True))[0])
    embd = tied.bytes_by_class()[TensorClass.TOKEN_EMBD]
    est = estimate_memory(tied, ServerFlags(ctx_size=4096, parallel=1), GPU)
    assert est.host.weights_bytes == embd
    assert est.device("CUDA0").weights_bytes == tied.weights_bytes  # everything else + the duplicated token_embd
    cpu_only = estimate_memory(tied, ServerFlags(ctx_size=4096, parallel=1))
    assert cpu_only.host.weights_bytes == tied.weights_bytes


def test_no_kv_offload_keeps_kv_and_state_on_the_cpu(a3b: ModelLayout) -> None:
    est = estimate_memory(a3b, ServerFlags(ctx_size=8192, parallel=2, no_kv_offload=True), GPU)
    assert est.device("CUDA0").kv_bytes == est.device("CUDA0").recurrent_bytes == 0
    assert est.host.kv_bytes == 8192 * a3b.kv_bytes_per_cell("f16", "f16")
    assert est.host.recurrent_bytes == 2 * a3b.recurrent_bytes_per_seq()
    assert est.device("CUDA0").weights_bytes > 0


def test_multi_gpu_split_follows_the_given_proportions(a3b: ModelLayout) -> None:
    devs = layer_devices(a3b.n_layer_all, None, ("CUDA0", "CUDA1"), (1.0, 3.0))
    n0, n1 = devs.count("CUDA0"), devs.count("CUDA1")
    assert n0 + n1 == a3b.n_layer_all + 1 and abs(n0 - (a3b.n_layer_all + 1) / 4) <= 1
    est = estimate_memory(a3b, ServerFlags(ctx_size=8192, parallel=1), ("CUDA0", "CUDA1"), (1.0, 3.0))
    g0, g1 = est.device("CUDA0"), est.device("CUDA1")
    assert g0.weights_bytes + g1.weights_bytes + est.host.weights_bytes == a3b.weights_bytes
    assert 2.5 < g1.weights_bytes / g0.weights_bytes < 3.5
    assert g0.kv_bytes + g1.kv_bytes == 8192 * a3b.kv_bytes_per_cell("f16", "f16")
    assert g0.compute_bytes > 0 and g1.compute_bytes > 0


def test_quantized_rows_are_padded_on_cuda(tmp_path: Path) -> None:
    # n_embd 96 is not a multiple of 512: each quantized row gets padding on a CUDA device, never on the CPU
    spec = SynthSpec(n_embd=96, n_head=4, head_dim=32, fill="zeros", types={"matrix": "q8_0", "experts": "q8_0",
                                                                             "embd": "q8_0", "output": "q8_0"})
    layout = local_layout(write_synthetic_gguf(tmp_path / "pad.gguf", spec)[0])
    cpu = estimate_memory(layout, ServerFlags(ctx_size=4096, parallel=1))
    gpu = estimate_memory(layout, ServerFlags(ctx_size=4096, parallel=1), GPU)
    assert cpu.weights_bytes == layout.weights_bytes
    assert gpu.weights_bytes > layout.weights_bytes


# ------------------------------------------------------------------------------- context, flags, compute model


@pytest.mark.parametrize(("flags", "n_ctx", "n_ctx_seq", "n_seq", "unified"), [
    ({"ctx_size": 10000, "parallel": 1}, 10240, 10240, 1, False),
    ({"ctx_size": 5000, "parallel": 3}, 5376, 1792, 3, False),
    ({"ctx_size": 5000, "parallel": 3, "kv_unified": True}, 5120, 5120, 3, True),
    ({"ctx_size": 8192}, 8192, 8192, 4, True),  # llama-server's auto: 4 slots, unified
    ({"ctx_size": 0, "parallel": 2}, 262144, 131072, 2, False),  # 0 = the model's n_ctx_train
])
def test_context_rounding(a3b: ModelLayout, flags: dict[str, object], n_ctx: int, n_ctx_seq: int, n_seq: int,
                          unified: bool) -> None:
    shape = context_shape(a3b, ServerFlags(**flags))  # type: ignore[arg-type]
    assert (shape.n_ctx, shape.n_ctx_seq, shape.n_seq, shape.unified) == (n_ctx, n_ctx_seq, n_seq, unified)


def test_reserved_graph_tokens_and_mask_width_follow_the_slots(a3b: ModelLayout) -> None:
    per_slot = context_shape(a3b, ServerFlags(ctx_size=10000, parallel=3))
    assert (per_slot.n_tok, per_slot.n_kv_mask) == (513, 3584)  # ubatch 512 rounded up to 3 sequences, one stream
    unified = context_shape(a3b, ServerFlags(ctx_size=10000, parallel=3, kv_unified=True))
    assert (unified.n_tok, unified.n_kv_mask) == (513, 10240)  # the whole cache
    small = context_shape(a3b, ServerFlags(ctx_size=256, parallel=1))
    assert small.n_tok == small.n_ubatch == 256  # the ubatch never exceeds the context


def test_host_memory_counts_checkpoints_and_the_prompt_cache(a3b: ModelLayout) -> None:
    state = a3b.recurrent_bytes_per_seq()
    assert state == 65_863_680  # 62.81 MiB: one checkpoint
    est = estimate_memory(a3b, ServerFlags(ctx_size=32768, parallel=2, ctx_checkpoints=8, cache_ram_mib=4096), GPU)
    assert est.checkpoints_bytes == 2 * 8 * state
    assert est.prompt_cache_bytes == 4096 * MiB
    assert est.host_total_bytes == est.host.total_bytes + 2 * 8 * state + 4096 * MiB
    host = est.to_dict()["memory"]["host"]
    assert host == {"checkpoints_bytes": 2 * 8 * state, "prompt_cache_bytes": 4096 * MiB,
                    "total_bytes": est.host_total_bytes}
    # llama-server's defaults: 4 slots x 32 checkpoints (~7.9 GiB) and an 8 GiB prompt cache, beyond the buffers
    default = estimate_memory(a3b, ServerFlags(ctx_size=32768), GPU)
    assert default.checkpoints_bytes == 4 * 32 * state and default.prompt_cache_bytes == 8192 * MiB
    lean = estimate_memory(a3b, ServerFlags(ctx_size=32768, ctx_checkpoints=0, cache_ram_mib=0), GPU)
    assert lean.host_total_bytes == lean.host.total_bytes
    unlimited = estimate_memory(a3b, ServerFlags(ctx_size=32768, cache_ram_mib=-1), GPU)
    assert unlimited.prompt_cache_bytes == 0 and any("no limit" in note for note in unlimited.notes)


def test_plain_transformers_keep_no_checkpoints(tmp_path: Path) -> None:
    llama = local_layout(write_synthetic_gguf(tmp_path / "llama.gguf", SynthSpec(arch="llama"))[0])
    est = estimate_memory(llama, ServerFlags(ctx_size=4096, parallel=2))
    assert est.recurrent_bytes == est.checkpoints_bytes == 0
    assert est.kv_bytes == 4096 * llama.kv_bytes_per_cell("f16", "f16") == 4096 * 4 * 2 * (2 * 16) * 2


def test_mtp_draft_kv_is_one_more_attention_layer_in_f16(a3b: ModelLayout) -> None:
    q8 = {"ctx_size": 32768, "parallel": 1, "cache_type_k": "q8_0", "cache_type_v": "q8_0"}
    plain = estimate_memory(a3b, ServerFlags(**q8))  # type: ignore[arg-type]
    mtp = estimate_memory(a3b, ServerFlags(spec_type="draft-mtp", **q8))  # type: ignore[arg-type]
    assert a3b.n_layer_all == a3b.n_layer + 1 == 41
    # the draft context's cache is --cache-type-k/v-draft (f16 by default), not the main q8_0
    assert mtp.kv_bytes - plain.kv_bytes == 32768 * a3b.kv_bytes_per_cell("f16", "f16", [a3b.n_layer]) == 64 * MiB
    # the snapshots: --spec-draft-n-max (3) more recurrent states per slot
    assert mtp.recurrent_bytes == 4 * plain.recurrent_bytes
    assert mtp.output_bytes == 2 * plain.output_bytes  # one output buffer per context
    # what the draft adds, named apart: MTP weights, its KV, the snapshots, its output and compute buffers
    flags = ServerFlags(spec_type="draft-mtp", **q8)  # type: ignore[arg-type]
    draft_compute = mtp_compute_bytes(a3b, context_shape(a3b, flags), True, False, 1)
    assert mtp.mtp_bytes == ((mtp.weights_bytes - plain.weights_bytes) + (mtp.kv_bytes - plain.kv_bytes)
                             + (mtp.recurrent_bytes - plain.recurrent_bytes) + (mtp.output_bytes - plain.output_bytes)
                             + draft_compute)


def test_quantized_v_without_flash_attention_is_refused(a3b: ModelLayout) -> None:
    with pytest.raises(TunerError, match="quantized V cache requires flash attention"):
        estimate_memory(a3b, ServerFlags(ctx_size=8192, cache_type_v="q8_0", flash_attn="off"))
    est = estimate_memory(a3b, ServerFlags(ctx_size=8192, parallel=1, cache_type_k="q8_0", flash_attn="off"))
    assert not est.flash_attn


def test_mtp_drafting_needs_the_mtp_layer(tmp_path: Path) -> None:
    plain = local_layout(write_synthetic_gguf(tmp_path / "plain.gguf", SynthSpec())[0])
    with pytest.raises(TunerError, match="needs a GGUF with the MTP layer"):
        estimate_memory(plain, ServerFlags(ctx_size=4096, spec_type="draft-mtp"))


@pytest.mark.parametrize(("changes", "message"), [
    ({"ctx_size": -1}, "--ctx-size must be 0"),
    ({"ubatch_size": 0}, "--ubatch-size must be positive"),
    ({"batch_size": -5}, "--batch-size must be positive"),
    ({"parallel": 0}, "--parallel must be positive"),
    ({"cache_type_k": "q3_K"}, "unknown cache type 'q3_K'"),
    ({"flash_attn": "maybe"}, "--flash-attn must be one of"),
    ({"spec_type": "eagle3"}, "is not sized by tuner"),
    ({"n_cpu_moe": -1}, "--n-cpu-moe must be 0 or positive"),
    ({"ctx_checkpoints": -1}, "--ctx-checkpoints and --spec-draft-n-max must be 0 or positive"),
    ({"cache_ram_mib": -2}, "--cache-ram must be -1 (no limit), 0 (off) or a size in MiB"),
])
def test_bad_flags_are_one_line_errors(changes: dict[str, object], message: str) -> None:
    with pytest.raises(TunerError) as exc:
        ServerFlags(**changes)  # type: ignore[arg-type]
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_which_block_sets_the_compute_buffer(a3b: ModelLayout, tmp_path: Path) -> None:
    def top(layout: ModelLayout, n_seq: int = 1, n_rs_seq: int = 0) -> str:
        peaks = activation_peaks(layout, 512, n_seq, n_rs_seq)
        return max(peaks, key=lambda k: peaks[k])

    assert top(a3b) == "moe_ffn"  # 147 456 B/token: the appendix-B fit
    assert activation_peaks(a3b, 512)["moe_ffn"] == 512 * 147_456
    assert top(a3b, n_seq=8) == "deltanet_state"  # 8 slots of 2 MiB recurrent state per layer
    assert top(a3b, n_seq=4, n_rs_seq=3) == "deltanet_state"  # MTP rollback snapshots
    dense = local_layout(write_synthetic_gguf(tmp_path / "dense.gguf", qwen35_35b_a3b_spec(
        arch="qwen35", n_layer=4, n_embd=5120, n_head=24, n_head_kv=4, n_ff=17408, ssm_dt_rank=48))[0])
    assert top(dense) == "dense_ffn"
    few_experts = local_layout(write_synthetic_gguf(tmp_path / "u2.gguf", qwen35_35b_a3b_spec(
        n_layer=4, n_expert=16, n_expert_used=2, n_ff_exp=256))[0])
    assert top(few_experts) == "deltanet_conv"


def test_compute_grows_with_ubatch_context_and_slots(a3b: ModelLayout) -> None:
    def compute(**flags: object) -> int:
        return estimate_memory(a3b, ServerFlags(**flags)).compute_bytes  # type: ignore[arg-type]

    # activations and inputs scale with the ubatch, the mask with ubatch x context
    assert compute(ctx_size=32768, parallel=1, ubatch_size=1024) == 2 * compute(ctx_size=32768, parallel=1)
    assert compute(ctx_size=65536, parallel=1) > compute(ctx_size=32768, parallel=1)
    # per-slot streams shrink the mask, a unified cache does not
    assert compute(ctx_size=65536, parallel=4, kv_unified=False) < compute(ctx_size=65536, parallel=4,
                                                                           kv_unified=True)
    assert compute(ctx_size=32768, parallel=1, flash_attn="off") > 10 * compute(ctx_size=32768, parallel=1) // 2


def test_to_dict_totals_are_the_sums_over_devices(a3b: ModelLayout) -> None:
    d = estimate_memory(a3b, ServerFlags(ctx_size=65536, n_gpu_layers=20), GPU).to_dict()
    mem = d["memory"]
    for key in ("weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "output_bytes", "total_bytes"):
        assert mem[key] == sum(dev[key] for dev in mem["devices"])
    for dev in mem["devices"]:
        assert dev["total_bytes"] == sum(dev[k] for k in ("weights_bytes", "kv_bytes", "recurrent_bytes",
                                                           "compute_bytes", "output_bytes"))
    assert d["context"]["n_ctx"] == 65536 and d["context"]["n_seq"] == 4

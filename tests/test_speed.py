"""The speed roofline: bytes per generated token, FLOPs per prompt token, and how they become tok/s."""

from __future__ import annotations

from dataclasses import replace

import pytest

from tuner import speed
from tuner.estimate import ServerFlags
from tuner.hardware import GB, Hardware, hardware_for
from tuner.layout import ModelLayout, TensorClass
from tuner.models import QuantCandidate, resolve_candidates
from tuner.speed import predict_speed, roofline
from tuner.units import GiB


@pytest.fixture(scope="module")
def ladder() -> dict[str, QuantCandidate]:
    return {c.quant: c for c in resolve_candidates(None)}


@pytest.fixture(scope="module")
def q4(ladder: dict[str, QuantCandidate]) -> ModelLayout:
    return ladder["Q4_K_M"].layout


def machine(gpu: str | None, ram_bw_gb_s: float = 50, cores: int = 8) -> Hardware:
    base = hardware_for(gpu or "none")
    return replace(base, ram_total_bytes=64 * GiB, ram_available_bytes=64 * GiB,
                   ram_bandwidth_bytes_s=int(ram_bw_gb_s * GB), cpu_physical_cores=cores)


FLAGS = ServerFlags(ctx_size=32768, parallel=1, flash_attn="on")
ACTIVE = 8 / 256


def hand_token_bytes(lay: ModelLayout, depth: int, kv: str = "f16") -> int:
    """Bytes one token reads, counted straight from the tensor list (not through the placement code)."""
    total = 0
    for t in lay.tensors:
        if t.cls is TensorClass.MTP:
            continue
        if t.cls is TensorClass.TOKEN_EMBD:
            total += t.nbytes // lay.n_vocab
        elif t.is_expert:
            total += round(t.nbytes * ACTIVE)
        else:
            total += t.nbytes
    total += depth * lay.kv_bytes_per_cell(kv, kv)
    total += 2 * lay.recurrent_bytes_per_seq()
    return total


def test_generation_reads_active_experts_all_other_weights_kv_at_depth_and_the_state_twice(q4: ModelLayout) -> None:
    roof = roofline(q4, FLAGS, ["CUDA0"], depth_tokens=4096)
    assert sum(roof.tg_bytes.values()) == pytest.approx(hand_token_bytes(q4, 4096), abs=len(q4.tensors))
    # only the token_embd row is read from RAM when everything is offloaded
    assert roof.tg_bytes["CPU"] == next(t.nbytes for t in q4.tensors if t.cls is TensorClass.TOKEN_EMBD) // q4.n_vocab


def test_kv_read_grows_by_exactly_depth_times_bytes_per_cell(q4: ModelLayout) -> None:
    shallow = roofline(q4, FLAGS, ["CUDA0"], depth_tokens=0).tg_bytes["CUDA0"]
    deep = roofline(q4, FLAGS, ["CUDA0"], depth_tokens=10_000).tg_bytes["CUDA0"]
    assert deep - shallow == 10_000 * 20_480  # 20 KiB per token at f16 for 35B-A3B
    q8 = roofline(q4, FLAGS.with_(cache_type_k="q8_0", cache_type_v="q8_0"), ["CUDA0"], depth_tokens=10_000)
    assert deep - q8.tg_bytes["CUDA0"] == 10_000 * (20_480 - 10_880)


def test_depth_is_capped_at_the_slot_context(q4: ModelLayout) -> None:
    flags = FLAGS.with_(ctx_size=4096)
    assert roofline(q4, flags, ["CUDA0"], depth_tokens=100_000).tg_bytes == \
        roofline(q4, flags, ["CUDA0"], depth_tokens=4096).tg_bytes


def test_n_cpu_moe_moves_the_active_expert_bytes_of_the_first_layers_to_ram(q4: ModelLayout) -> None:
    base = roofline(q4, FLAGS, ["CUDA0"])
    moved = roofline(q4, FLAGS.with_(n_cpu_moe=10), ["CUDA0"])
    per_layer = q4.expert_bytes_by_layer()
    expected = sum(per_layer[i] for i in range(10)) * ACTIVE
    assert moved.tg_bytes["CPU"] - base.tg_bytes["CPU"] == pytest.approx(expected, abs=40)
    assert sum(moved.tg_bytes.values()) == sum(base.tg_bytes.values())


def test_tg_bound_is_bytes_over_bandwidth_and_the_prediction_adds_efficiencies_and_per_layer_costs(
        q4: ModelLayout) -> None:
    hw = machine("rtx-5080", ram_bw_gb_s=60)
    flags = FLAGS.with_(n_cpu_moe=20)
    roof = roofline(q4, flags, ["CUDA0"])
    gpu_bw = hw.gpus[0].mem_bandwidth_bytes_s
    weights_s = (roof.tg_bytes["CUDA0"] - roof.tg_kv_bytes["CUDA0"]) / gpu_bw
    kv_s = roof.tg_kv_bytes["CUDA0"] / gpu_bw
    cpu_s = roof.tg_bytes["CPU"] / hw.ram_bandwidth_bytes_s
    pred = predict_speed(q4, flags, hw)
    assert pred.tg_bound_tok_s == pytest.approx(1 / (weights_s + kv_s + cpu_s))
    layers_s = 40 * speed.GPU_LAYER_SECONDS["blackwell"]  # every layer runs on the GPU; its experts' bytes in RAM
    assert pred.tg_tok_s == pytest.approx(1 / (weights_s / speed.GPU_TG_BANDWIDTH_EFFICIENCY
                                               + kv_s / speed.KV_READ_EFFICIENCY
                                               + cpu_s / speed.RAM_EFFICIENCY + layers_s))
    assert pred.efficiency == pytest.approx(pred.tg_tok_s / pred.tg_bound_tok_s)
    assert pred.source == "roofline"


def test_per_layer_costs_follow_the_gpu_generation(q4: ModelLayout) -> None:
    terms = {g: speed.speed_terms(q4, FLAGS, machine(g)) for g in ("rtx-3090", "rtx-4090", "rtx-5090", "h100-80gb")}
    assert terms["rtx-3090"].gpu_layers == {"ampere": 40}
    assert terms["rtx-4090"].gpu_layers == {"ada": 40}
    assert terms["rtx-5090"].gpu_layers == {"blackwell": 40}
    assert terms["h100-80gb"].gpu_layers == {"hopper": 40}
    assert speed.tg_parts(terms["rtx-4090"])["GPU_LAYER_SECONDS.ada"] == pytest.approx(40 * 101.3e-6)


def test_a_generation_without_a_fitted_layer_cost_takes_the_slowest_fitted_one_and_says_so(q4: ModelLayout) -> None:
    slowest = max(speed.GPU_LAYER_SECONDS.values())
    pred = predict_speed(q4, FLAGS, machine("h100-80gb"))
    assert speed.gpu_layer_seconds("hopper")[0] == slowest
    assert any("hopper" in n and "per-layer cost" in n for n in pred.notes)
    assert not any("per-layer cost" in n for n in predict_speed(q4, FLAGS, machine("rtx-4090")).notes)


def test_cpu_only_generation_is_ram_bandwidth_over_all_active_bytes(q4: ModelLayout) -> None:
    hw = machine(None, ram_bw_gb_s=80)
    pred = predict_speed(q4, FLAGS, hw)
    bytes_s = hand_token_bytes(q4, speed.PLANNING_DEPTH_TOKENS) / (80 * GB)
    assert pred.tg_bound_tok_s == pytest.approx(1 / bytes_s, rel=1e-6)
    assert pred.tg_tok_s == pytest.approx(1 / (bytes_s / speed.RAM_EFFICIENCY + 40 * speed.CPU_LAYER_SECONDS), rel=1e-6)


def test_faster_memory_predicts_proportionally_faster_generation(q4: ModelLayout) -> None:
    p3090 = predict_speed(q4, FLAGS, machine("rtx-3090"))
    h100 = predict_speed(q4, FLAGS, machine("h100-80gb"))
    assert h100.tg_bound_tok_s / p3090.tg_bound_tok_s == pytest.approx(3350 / 936, rel=0.01)


def test_prompt_flops_are_twice_the_active_params_plus_attention_at_depth(q4: ModelLayout) -> None:
    depth = 2048
    roof = roofline(q4, FLAGS, ["CUDA0"], depth_tokens=depth)
    params = 0.0
    for t in q4.tensors:
        if t.cls in (TensorClass.MTP, TensorClass.TOKEN_EMBD, TensorClass.OUTPUT) or len(t.shape) < 2:
            continue
        n = 1
        for d in t.shape:
            n *= d
        params += n * (ACTIVE if t.is_expert else 1)
    attention = len(q4.attention_layers) * 2 * 16 * (256 + 256) * depth
    deltanet = len(q4.recurrent_layers) * 6 * 128 * 4096
    assert roof.pp_flops["CUDA0"] == pytest.approx(2 * params + attention + deltanet)
    assert 2.3e9 < params < 2.6e9  # "A3B": ~3B active, of which the 0.5B output head runs for the last token only


def test_experts_in_ram_are_copied_to_the_gpu_once_per_ubatch(q4: ModelLayout) -> None:
    flags = FLAGS.with_(n_cpu_moe=24)
    roof = roofline(q4, flags, ["CUDA0"])
    assert roof.pp_offload_bytes == sum(q4.expert_bytes_by_layer()[i] for i in range(24))
    assert "CPU" not in roof.pp_flops  # op offload: the GPU multiplies them
    hw = machine("rtx-5080")
    small = predict_speed(q4, flags, hw)
    big = predict_speed(q4, flags.with_(ubatch_size=2048), hw)
    assert big.pp_tok_s > 1.5 * small.pp_tok_s
    assert big.tg_tok_s == pytest.approx(small.tg_tok_s)
    # below the op-offload batch size the CPU multiplies its own experts
    tiny = roofline(q4, flags.with_(ubatch_size=16), ["CUDA0"])
    assert tiny.pp_offload_bytes == 0 and tiny.pp_flops["CPU"] > 0


def test_prompt_speed_on_one_gpu_is_bounded_by_its_fp16_throughput(q4: ModelLayout) -> None:
    hw = machine("rtx-4090")
    roof = roofline(q4, FLAGS, ["CUDA0"])
    pred = predict_speed(q4, FLAGS, hw)
    compute_s = roof.pp_flops["CUDA0"] / 330.3e12
    memory_s = roof.pp_weight_bytes["CUDA0"] / hw.gpus[0].mem_bandwidth_bytes_s / 512
    assert pred.pp_bound_tok_s == pytest.approx(1 / max(compute_s, memory_s))


def test_quantized_kv_costs_an_f16_conversion_per_ubatch_on_the_gpu(q4: ModelLayout) -> None:
    q8 = FLAGS.with_(cache_type_k="q8_0", cache_type_v="q8_0")
    roof = roofline(q4, q8, ["CUDA0"], depth_tokens=8192)
    assert roof.pp_kv_convert_bytes["CUDA0"] == 8192 * (10_880 + 20_480)
    assert roofline(q4, FLAGS, ["CUDA0"], depth_tokens=8192).pp_kv_convert_bytes == {}


def test_catalog_fp16_throughput_and_a_noted_fallback_for_unknown_gpus() -> None:
    gpu = hardware_for("rtx-4090").gpus[0]
    assert speed.gpu_fp16_flops(gpu) == (330.3e12, None)
    flops, note = speed.gpu_fp16_flops(replace(gpu, name="Mystery GPU 9000"))
    assert flops == speed.GENERIC_GPU_FP16_FLOPS and note and "Mystery GPU 9000" in note


def test_pcie_bandwidth_is_lanes_times_per_lane_rate() -> None:
    gpu = hardware_for("rtx-5060-ti").gpus[0]  # PCIe 5.0 x8
    assert speed.pcie_bytes_s(gpu) == pytest.approx(8 * 3.938 * GB)


def test_prediction_is_the_sum_of_the_parts_each_coefficient_scales(q4: ModelLayout) -> None:
    hw = machine("rtx-4070", ram_bw_gb_s=51.2)
    flags = FLAGS.with_(n_cpu_moe=23)
    terms = speed.speed_terms(q4, flags, hw, depth_tokens=8192)
    pred = predict_speed(q4, flags, hw, depth_tokens=8192)
    assert 1 / pred.tg_tok_s == pytest.approx(sum(speed.tg_parts(terms).values()))
    assert 1 / pred.pp_tok_s == pytest.approx(sum(speed.pp_parts(terms).values()))
    assert speed.pp_parts(terms)["PCIE_EFFICIENCY"] == pytest.approx(terms.pp_pcie_s / speed.PCIE_EFFICIENCY)
    assert terms.pp_pcie_s > 0 and terms.tg_cpu_bytes_s > 0


def test_the_mtp_block_is_not_read_when_not_drafting() -> None:
    from tuner.cards import card_layout, load_card

    with_mtp = card_layout(load_card("qwen3.6-35b-a3b"), "Q4_K_M", mtp=True)
    without = card_layout(load_card("qwen3.6-35b-a3b"), "Q4_K_M", mtp=False)
    assert roofline(with_mtp, FLAGS, ["CUDA0"]).tg_bytes == roofline(without, FLAGS, ["CUDA0"]).tg_bytes


# Figures people report for Qwen3.5-35B-A3B Q4_K_M, as issue 10 quotes them: (card, --n-cpu-moe or all experts on the
# CPU, reported tok/s). The RTX 4090 one is record 6 of tests/data/speed-measurements.yaml (fitted on); the RTX 5080
# ones are community figures outside the data file, from hosts of unknown RAM, here on dual-channel DDR5-6000.
REPORTED_TG = [
    ("rtx-4090", 0, 166.3),
    ("rtx-5080", 24, 67.5),  # "~65-70 tok/s with --n-cpu-moe 24"
    ("rtx-5080", 40, 50.0),  # "~50 tok/s with all experts on CPU"
]


@pytest.mark.parametrize(("gpu", "n_cpu_moe", "reported"), REPORTED_TG)
def test_predicted_generation_is_near_the_reported_figures(q4: ModelLayout, gpu: str, n_cpu_moe: int,
                                                           reported: float) -> None:
    flags = FLAGS.with_(n_cpu_moe=n_cpu_moe, cache_type_k="q8_0", cache_type_v="q8_0")
    pred = predict_speed(q4, flags, machine(gpu, ram_bw_gb_s=96), depth_tokens=512)
    assert 0.8 <= pred.tg_tok_s / reported <= 1.25, f"{pred.tg_tok_s:.1f} predicted vs {reported} reported"
    assert pred.tg_tok_s < pred.tg_bound_tok_s

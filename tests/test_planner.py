"""The planner on Qwen3.5-35B-A3B's card ladder: plans fit with the buffer kept, spill experts minimally, take the
most context, and say why; CPU-only planning, host-RAM levers, the no-fit error and the plan's command."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from tuner.cards import load_card
from tuner.errors import TunerError
from tuner.estimate import ServerFlags, estimate_memory
from tuner.flags import flags_from_args
from tuner.hardware import GB, Hardware, hardware_for
from tuner.models import QuantCandidate, resolve_candidates
from tuner.planner import (
    DEFAULT_RAM_BUFFER_BYTES,
    DEFAULT_VRAM_BUFFER_BYTES,
    VISION_COMPUTE_BYTES,
    WORKING_CTX,
    Plan,
    Prediction,
    Wishes,
    budget_for,
    fits,
    headroom_bytes,
    plan_for,
    recommend,
    threads_for,
)
from tuner.policy import CTX_FLOOR, QUALITY_FLOOR_QUANT, SPEED_WINDOW
from tuner.units import GiB, MiB, fmt_bytes

NATIVE_CTX = 262_144


@pytest.fixture(scope="module")
def ladder() -> list[QuantCandidate]:
    return resolve_candidates(None)


def machine(gpu: str, ram_gib: float = 64) -> Hardware:
    """A catalog GPU (or none) with a fixed host, so plans do not depend on the machine running the tests."""
    return replace(hardware_for(gpu), ram_total_bytes=int(ram_gib * GiB), ram_available_bytes=int(ram_gib * GiB),
                   ram_bandwidth_bytes_s=50 * GB, cpu_physical_cores=8, cpu_logical_cores=16, cpu_busy_logical=0.0)


def reestimate(plan: Plan, flags: ServerFlags, hardware: Hardware):  # -> MemoryEstimate
    return estimate_memory(plan.candidate.layout, flags, [g.llama_name for g in hardware.gpus])


def assert_minimal_experts_and_maximal_context(plan: Plan, hardware: Hardware, *, ctx_asked: bool = False,
                                               floor: int | None = None) -> None:
    """The plan's own estimate fits with the buffer kept; one expert layer fewer in RAM does not fit (at the plan's
    context, and at ``floor``, the context the placement was searched at); 256 more tokens of context do not fit
    unless the plan is at the native maximum."""
    f = plan.flags
    own = reestimate(plan, f, hardware)
    assert own == plan.estimate
    assert fits(own, plan.budget)
    assert all(v >= 0 for v in headroom_bytes(own, plan.budget).values())
    for name, free in plan.budget.gpu_free_bytes:  # the buffer is really kept on every GPU
        assert own.device(name).total_bytes + plan.budget.buffer_bytes <= free
    assert own.host_total_bytes <= hardware.ram_available_bytes
    if floor is not None:
        assert own.n_ctx_seq >= floor
    if f.n_cpu_moe > 0:
        fewer = f.with_(n_cpu_moe=f.n_cpu_moe - 1)
        assert not fits(reestimate(plan, fewer, hardware), plan.budget)
        if floor is not None:
            assert not fits(reestimate(plan, fewer.with_(ctx_size=floor * f.n_seq), hardware), plan.budget)
    if ctx_asked:
        return
    if own.n_ctx_seq < NATIVE_CTX:
        bigger = f.with_(ctx_size=(own.n_ctx_seq + 256) * f.n_seq)
        assert not fits(reestimate(plan, bigger, hardware), plan.budget)
    else:
        assert own.n_ctx_seq == NATIVE_CTX


@pytest.mark.parametrize("gpu", ["rtx-3090", "rtx-4090", "rtx-5080", "rtx-5060-ti", "h100-80gb"])
@pytest.mark.parametrize("prefer", ["speed", "quality", "context", "balanced"])
def test_plan_fits_with_the_buffer_kept_fewest_experts_in_ram_and_the_most_context(
        ladder: list[QuantCandidate], gpu: str, prefer: str) -> None:
    hw = machine(gpu)
    rec = recommend(ladder, hw, Wishes(prefer=prefer))
    assert rec.plan.budget.buffer_bytes == DEFAULT_VRAM_BUFFER_BYTES
    # every plan reached its context floor: no note beyond how the chosen file was sized, no warning
    assert [n for n in rec.notes if n not in rec.plan.candidate.notes] == [] and not rec.warnings
    # the floor each placement was searched at: 32768 tokens, the native 262144 for context; balanced searches one
    # placement per context tier (so only the plan's own context is checked) and keeps 65536 at least
    floor = {"context": NATIVE_CTX, "balanced": None}.get(prefer, WORKING_CTX)
    assert_minimal_experts_and_maximal_context(rec.plan, hw, floor=floor)
    assert 2 <= len(rec.alternatives) <= 4
    for alt, why in rec.alternatives:
        assert why and alt is not rec.plan
        assert_minimal_experts_and_maximal_context(alt, hw, floor=floor)
        if prefer == "balanced":
            assert alt.estimate.n_ctx_seq >= CTX_FLOOR


def test_the_80gb_card_holds_the_whole_model_at_native_context(ladder: list[QuantCandidate]) -> None:
    for prefer in ("speed", "quality", "context"):
        plan = recommend(ladder, machine("h100-80gb"), Wishes(prefer=prefer)).plan
        assert plan.flags.n_cpu_moe == 0 and plan.flags.n_gpu_layers is None
        assert plan.estimate.n_ctx_seq == NATIVE_CTX
        assert plan.estimate.host.weights_bytes < 1 * GiB  # token_embd only
    # and with --prefer quality, its best quant: BF16 (64.6 GiB) still fits whole
    assert recommend(ladder, machine("h100-80gb"), Wishes(prefer="quality")).plan.quant == "BF16"


@pytest.mark.parametrize("gpu", ["rtx-5080", "rtx-5060-ti"])
def test_16gb_cards_offload_experts_or_drop_a_quant_and_say_which_and_why(
        ladder: list[QuantCandidate], gpu: str) -> None:
    rec = recommend(ladder, machine(gpu), Wishes())
    plan = rec.plan
    q4 = next(c for c in ladder if c.quant == "Q4_K_M")
    assert plan.flags.n_cpu_moe > 0 or plan.candidate.quality_rank < q4.quality_rank
    text = " ".join(plan.reasons)
    if plan.flags.n_cpu_moe > 0:
        assert f"--n-cpu-moe {plan.flags.n_cpu_moe}: the fewest expert layers in RAM" in text
        assert "attention, DeltaNet" in text and "stay on the GPU" in text
    if plan.candidate.quality_rank < q4.quality_rank:  # dropped below Q4_K_M: says what the next better would cost
        better = min((c for c in ladder if c.quality_rank > plan.candidate.quality_rank), key=lambda c: c.quality_rank)
        assert f"{better.quant}, the next better quant, would need --n-cpu-moe" in text
    assert "rather than drop to" in text  # and what fitting entirely on the GPU would have meant

    forced = recommend(ladder, machine(gpu), Wishes(quant="Q4_K_M")).plan
    assert forced.quant == "Q4_K_M" and forced.flags.n_cpu_moe > 0
    assert_minimal_experts_and_maximal_context(forced, machine(gpu))


def test_speed_keeps_an_exact_kv_cache_when_quantizing_buys_little(ladder: list[QuantCandidate]) -> None:
    rec = recommend(ladder, machine("rtx-3090"), Wishes(prefer="speed"))
    assert rec.plan.flags.cache_type_k == "f16" and rec.plan.flags.cache_type_v == "f16"
    kv_alt = [(a, why) for a, why in rec.alternatives if a.candidate is rec.plan.candidate]
    assert kv_alt and kv_alt[0][0].flags.cache_type_k == "q8_0"
    assert "not worth quantizing" in kv_alt[0][1]


def test_prefer_context_reaches_native_context_on_a_16gb_card(ladder: list[QuantCandidate]) -> None:
    """On a 24 GB card the speed plan of the real files (a quant that fits whole) already reaches the native context;
    on 16 GB it stops short, and --prefer context moves more experts to RAM to get there."""
    speed = recommend(ladder, machine("rtx-5080"), Wishes(prefer="speed")).plan
    context = recommend(ladder, machine("rtx-5080"), Wishes(prefer="context")).plan
    assert speed.estimate.n_ctx_seq < NATIVE_CTX
    assert context.estimate.n_ctx_seq == NATIVE_CTX
    assert any("native maximum" in r for r in context.reasons)


def test_prefer_quality_takes_a_better_quant_than_speed(ladder: list[QuantCandidate]) -> None:
    speed = recommend(ladder, machine("rtx-4090"), Wishes(prefer="speed")).plan
    quality = recommend(ladder, machine("rtx-4090"), Wishes(prefer="quality")).plan
    assert quality.candidate.quality_rank > speed.candidate.quality_rank
    assert quality.predicted.tg_tok_s >= speed.predicted.tg_tok_s / 3


def test_cpu_only_plans_for_ram(ladder: list[QuantCandidate]) -> None:
    hw = machine("none", ram_gib=64)
    rec = recommend(ladder, hw, Wishes())
    plan = rec.plan
    assert plan.budget.cpu_only and plan.budget.device == "CPU"
    assert plan.budget.buffer_bytes == DEFAULT_RAM_BUFFER_BYTES
    assert plan.estimate.gpu_devices == ()
    assert plan.estimate.host_total_bytes + plan.budget.buffer_bytes <= hw.ram_available_bytes
    assert_minimal_experts_and_maximal_context(plan, hw)
    assert any("no GPU" in r for r in plan.reasons)


def test_a_cpu_only_plan_puts_every_cost_in_ram_and_a_gpu_plan_names_vram(ladder: list[QuantCandidate]) -> None:
    cpu = recommend(ladder, machine("none", ram_gib=64), Wishes()).plan
    assert not any("VRAM" in r for r in cpu.reasons), cpu.reasons
    assert any(r.startswith("--parallel 1: ") and r.endswith("all in RAM") for r in cpu.reasons), cpu.reasons
    gpu = recommend(ladder, machine("rtx-4090"), Wishes()).plan
    assert any(r.startswith("--parallel 1: ") and "recurrent state in VRAM" in r for r in gpu.reasons), gpu.reasons


def test_small_ram_lowers_the_prompt_cache_before_giving_up(ladder: list[QuantCandidate]) -> None:
    hw = machine("none", ram_gib=24)
    plan = recommend(ladder, hw, Wishes(quant="Q4_K_M", ctx_size=32768)).plan
    assert plan.flags.cache_ram_mib < 8192
    assert fits(plan.estimate, plan.budget)
    assert any(r.startswith(f"--cache-ram {plan.flags.cache_ram_mib}") for r in plan.reasons)
    assert f"--cache-ram {plan.flags.cache_ram_mib}" in " ".join(plan.command())


def test_tighter_ram_also_lowers_context_checkpoints(ladder: list[QuantCandidate]) -> None:
    q4 = next(c for c in ladder if c.quant == "Q4_K_M")
    hw = machine("none", ram_gib=(q4.layout.weights_bytes + 1.5 * GiB + 300 * MiB) / GiB)
    plan = recommend(ladder, hw, Wishes(quant="Q4_K_M", ctx_size=4096)).plan
    assert plan.flags.cache_ram_mib == 0 and plan.flags.ctx_checkpoints < 32
    assert fits(plan.estimate, plan.budget)


def test_nothing_fits_is_an_error_saying_the_smallest_need_and_what_is_available(
        ladder: list[QuantCandidate]) -> None:
    with pytest.raises(TunerError) as err:
        recommend(ladder, machine("none", ram_gib=8), Wishes())
    message = str(err.value)
    assert "nothing fits at 4096 tokens of context" in message
    assert "Q2_K" in message and "needs" in message and "available" in message


def test_a_16gb_card_with_a_small_host_cannot_hold_experts_in_ram(ladder: list[QuantCandidate]) -> None:
    with pytest.raises(TunerError, match=r"\(Q4_K_M, .*\) needs .* of VRAM and .* of RAM"):
        recommend(ladder, machine("rtx-5080", ram_gib=3), Wishes(quant="Q4_K_M"))
    # the same host holds a quant that needs no experts in RAM at 32K (--prefer speed)
    assert recommend(ladder, machine("rtx-5080", ram_gib=3), Wishes(prefer="speed")).plan.flags.n_cpu_moe == 0


def test_parallel_slots_get_separate_caches_and_their_own_state(ladder: list[QuantCandidate]) -> None:
    hw = machine("rtx-4090")
    plan = recommend(ladder, hw, Wishes(parallel=2, ctx_size=65536)).plan
    assert plan.flags.parallel == 2 and plan.flags.kv_unified is False
    assert plan.estimate.n_ctx_seq == 65536 and plan.flags.ctx_size == 131072
    assert plan.estimate.recurrent_bytes == 2 * plan.candidate.layout.recurrent_bytes_per_seq()
    assert_minimal_experts_and_maximal_context(plan, hw, ctx_asked=True)


def test_an_asked_context_is_kept_exactly_and_beyond_native_needs_yarn(ladder: list[QuantCandidate]) -> None:
    hw = machine("h100-80gb")
    plan = recommend(ladder, hw, Wishes(ctx_size=100_000)).plan
    assert plan.estimate.n_ctx_seq == 100_096  # padded to 256 as llama.cpp does
    with pytest.raises(TunerError, match="beyond the model's native context"):
        recommend(ladder, hw, Wishes(ctx_size=500_000))
    yarn = recommend(ladder, hw, Wishes(ctx_size=500_000, allow_yarn=True)).plan
    command = yarn.command()
    assert command[command.index("--rope-scaling") + 1] == "yarn"
    assert command[command.index("--rope-scale") + 1] == "2"


def test_forced_cache_type_and_unknown_quant(ladder: list[QuantCandidate]) -> None:
    plan = recommend(ladder, machine("rtx-3090"), Wishes(cache_type="q8_0")).plan
    assert plan.flags.cache_type_k == plan.flags.cache_type_v == "q8_0"
    with pytest.raises(TunerError, match="no quant 'Q9_X'"):
        recommend(ladder, machine("rtx-3090"), Wishes(quant="Q9_X"))


def test_vision_counts_the_projector_in_the_gpus_memory_and_loads_it(ladder: list[QuantCandidate]) -> None:
    hw = machine("rtx-3090")
    plain = recommend(ladder, hw, Wishes(quant="Q4_K_M")).plan
    vision = recommend(ladder, hw, Wishes(quant="Q4_K_M", vision=True)).plan
    projector = vision.candidate.vision_projector()
    assert projector is not None and projector.weights_bytes == vision.candidate.mmproj_bytes
    cuda0 = vision.estimate.device("CUDA0")
    assert cuda0.vision_bytes == projector.weights_bytes + projector.compute_bytes(True)
    assert vision.estimate.host.vision_bytes == 0 and plain.estimate.vision_bytes == 0
    assert vision.budget.reserved_bytes == projector.growth_bytes() > 0  # what an image grows it by, unlogged
    assert projector.compute_bytes(True) + vision.budget.reserved_bytes < VISION_COMPUTE_BYTES + 256 * MiB
    assert vision.estimate.n_ctx_seq < plain.estimate.n_ctx_seq
    assert any(r.startswith("vision: mmproj-F16.gguf on CUDA0") for r in vision.reasons)
    command = vision.command(model_path="/m/q4.gguf", mmproj_path="/m/mmproj.gguf")
    at = command.index("--mmproj")
    assert command[at + 1] == "/m/mmproj.gguf" and "--no-mmproj" not in command
    assert "--no-mmproj" in plain.command(model_path="/m/q4.gguf")  # no projector behind the plan's back


def test_vision_without_a_gpu_counts_the_projector_in_ram(ladder: list[QuantCandidate]) -> None:
    hw = machine("none", ram_gib=64)
    plan = recommend(ladder, hw, Wishes(vision=True)).plan
    b = plan.budget
    projector = plan.candidate.vision_projector()
    assert projector is not None and plan.estimate.host.vision_bytes == projector.total_bytes()
    assert b.reserved_bytes == projector.growth_bytes()
    assert plan.estimate.host_total_bytes + b.buffer_bytes + b.reserved_bytes <= hw.ram_available_bytes
    assert "--mmproj" not in plan.command() and "--no-mmproj" not in plan.command()  # -hf loads the projector
    assert plan.command(model_path="/m/x.gguf", mmproj_path="/m/mmproj.gguf")[-12:-10] == ["--mmproj", "/m/mmproj.gguf"]


def test_printed_command_runs_as_printed_hub_file_by_repo_and_quant_local_file_by_absolute_path(
        ladder: list[QuantCandidate], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A card's quant is not on disk: llama-server fetches it itself (``--hf-repo REPO:QUANT``, and no projector
    unless vision is on); a local file is named by its absolute path, whatever path it was given as."""
    plan = recommend(ladder, machine("rtx-5080"), Wishes(quant="UD-Q4_K_XL")).plan
    command = plan.command()
    assert command[1:3] == ["--hf-repo", "unsloth/Qwen3.5-35B-A3B-GGUF:UD-Q4_K_XL"]
    assert "--no-mmproj" in command and not any(a.endswith(".gguf") for a in command)
    from tuner.synth import SynthSpec, write_synthetic_gguf

    write_synthetic_gguf(tmp_path / "m.gguf", SynthSpec())
    monkeypatch.chdir(tmp_path)
    local = recommend(resolve_candidates("m.gguf"), machine("none"), Wishes(ctx_size=1024)).plan
    assert local.command()[1:3] == ["--model", str(tmp_path / "m.gguf")]
    assert "--no-mmproj" in local.command()  # harmless with --model; no projector if -hf replaces it


def test_plan_command_is_the_flags_with_fit_off_jinja_and_the_cards_sampling(ladder: list[QuantCandidate]) -> None:
    plan = recommend(ladder, machine("rtx-5080"), Wishes()).plan
    sampling = load_card(plan.candidate.card_key or "").sampling_args()
    command = plan.command("/opt/llama-server", model_path="/models/x.gguf")
    assert command[:3] == ["/opt/llama-server", "--model", "/models/x.gguf"]
    assert command[3:3 + len(plan.flags.to_args())] == plan.flags.to_args()
    assert command[-(4 + len(sampling)):] == ["--fit", "off", "--jinja", "--no-mmproj", *sampling]
    coding = plan.command(model_path="/m.gguf", preset="non-thinking")
    assert coding[-2:] == ["--reasoning", "off"] and "0.8" in coding  # top_p 0.8
    read_back, rest = flags_from_args(command[3:])
    assert read_back == plan.flags and "--jinja" in rest
    d = plan.to_dict()
    for key in ("model", "quant", "file", "cache_type_k", "cache_type_v", "n_cpu_moe", "n_gpu_layers", "ctx_size",
                "parallel", "batch_size", "ubatch_size", "flash_attn", "kv_unified"):
        assert key in d
    assert d["n_cpu_moe"] == plan.flags.n_cpu_moe and d["ubatch_size"] == plan.flags.ubatch_size


def test_experts_in_ram_raise_the_ubatch_only_within_the_speed_tolerance(ladder: list[QuantCandidate]) -> None:
    plan = recommend(ladder, machine("rtx-5080"), Wishes()).plan
    assert plan.flags.n_cpu_moe > 0 and plan.flags.ubatch_size in (1024, 2048)
    assert any(r.startswith(f"--ubatch-size {plan.flags.ubatch_size}") for r in plan.reasons)
    assert recommend(ladder, machine("rtx-3090"), Wishes()).plan.flags.ubatch_size == 512  # nothing in RAM


def test_measured_speeds_replace_the_roofline(ladder: list[QuantCandidate]) -> None:
    seen: list[ServerFlags] = []

    def measured(cand: QuantCandidate, flags: ServerFlags, hw: Hardware) -> Prediction | None:
        seen.append(flags)
        if cand.quant != "Q6_K":
            return None
        return Prediction(tg_tok_s=500.0, pp_tok_s=9000.0, tg_bound_tok_s=600.0, pp_bound_tok_s=20000.0,
                          efficiency=500 / 600, source="measured")

    plan = recommend(ladder, machine("h100-80gb"), Wishes(), measured=measured).plan
    assert seen
    assert plan.quant == "Q6_K" and plan.predicted.source == "measured" and plan.predicted.tg_tok_s == 500.0


def test_budget_takes_free_vram_and_the_buffer_asked_for() -> None:
    hw = machine("rtx-4090")
    b = budget_for(hw, Wishes(buffer_bytes=2 * GiB))
    assert (b.device, b.buffer_bytes, b.vram_free_bytes) == ("CUDA0", 2 * GiB, hw.gpus[0].vram_free_bytes)
    assert b.gpu_free_bytes == (("CUDA0", hw.gpus[0].vram_free_bytes),)
    two = budget_for(machine("rtx-3090x2"), Wishes())
    assert two.device == "CUDA0+CUDA1" and two.vram_total_bytes == 2 * hardware_for("rtx-3090").gpus[0].vram_total_bytes


def test_a_bigger_buffer_never_gives_a_bigger_plan(ladder: list[QuantCandidate]) -> None:
    hw = machine("rtx-5080")
    small = recommend(ladder, hw, Wishes(quant="Q4_K_M", buffer_bytes=512 * MiB)).plan
    large = recommend(ladder, hw, Wishes(quant="Q4_K_M", buffer_bytes=3 * GiB)).plan
    assert large.flags.n_cpu_moe > small.flags.n_cpu_moe


def test_two_gpus_split_layers_and_every_gpu_keeps_its_buffer(ladder: list[QuantCandidate]) -> None:
    hw = machine("rtx-3090x2")
    plan = recommend(ladder, hw, Wishes(prefer="quality")).plan
    assert {d.name for d in plan.estimate.gpu_devices} == {"CUDA0", "CUDA1"}
    assert fits(plan.estimate, plan.budget)


def test_wishes_are_checked() -> None:
    with pytest.raises(TunerError, match="--prefer"):
        Wishes(prefer="fast")
    with pytest.raises(TunerError, match="--parallel"):
        Wishes(parallel=0)
    with pytest.raises(TunerError):
        Wishes(cache_type="q3_0")


def test_plan_for_uses_the_card_ladder_by_default() -> None:
    rec = plan_for(None, machine("rtx-4090"), Wishes())
    assert rec.plan.candidate.card_key == "qwen3.5-35b-a3b"
    assert rec.planning_s > 0


def test_a_gpu_too_small_for_the_vision_projector_is_a_no_fit_error_counting_it(
        ladder: list[QuantCandidate]) -> None:
    hw = machine("rtx-4090")
    tiny = replace(hw, gpus=(replace(hw.gpus[0], vram_total_bytes=512 * MiB, vram_free_bytes=512 * MiB),))
    text = recommend(ladder, tiny, Wishes(buffer_bytes=0)).plan  # text alone: whole layers in RAM
    assert text.flags.n_gpu_layers is not None and fits(text.estimate, text.budget)
    with pytest.raises(TunerError) as err:
        recommend(ladder, tiny, Wishes(buffer_bytes=0, vision=True))
    message = str(err.value)
    projector = ladder[0].vision_projector()
    assert projector is not None
    reserve = fmt_bytes(projector.total_bytes() + projector.growth_bytes())
    assert "nothing fits at 4096 tokens of context" in message
    assert f"needs {reserve} of VRAM ({reserve} of it for the vision projector)" in message  # -ngl 0: nothing else
    assert "available: 512.0 MiB of VRAM after a 0 B buffer per GPU" in message


# ----------------------------------------------------------------------------------------- the balanced default


COMMON_CARDS = ("rtx-3060", "rtx-5060-ti", "rtx-5080", "rtx-3090", "rtx-4090")


@pytest.mark.parametrize("gpu", COMMON_CARDS)
def test_the_default_keeps_q4_k_m_class_and_64k_tokens_within_10_percent_of_the_fastest_such_plan(
        ladder: list[QuantCandidate], gpu: str) -> None:
    q4 = next(c for c in ladder if c.quant == QUALITY_FLOOR_QUANT)
    rec = recommend(ladder, machine(gpu, ram_gib=64), Wishes())
    plan = rec.plan
    assert rec.wishes.prefer == "balanced" and rec.policy["name"] == "balanced" and not rec.warnings
    assert plan.candidate.quality_rank >= q4.quality_rank and plan.estimate.n_ctx_seq >= CTX_FLOOR
    fastest = max([plan, *(a for a, _ in rec.alternatives)], key=lambda p: p.predicted.tg_tok_s
                  if p.candidate.quality_rank >= q4.quality_rank and p.estimate.n_ctx_seq >= CTX_FLOOR else 0)
    assert plan.predicted.tg_tok_s >= (1 - SPEED_WINDOW) * fastest.predicted.tg_tok_s
    assert rec.policy["reference_tg_tok_s"] == pytest.approx(fastest.predicted.tg_tok_s, abs=0.1)


def test_the_default_takes_more_context_than_the_fastest_floor_plan_when_it_costs_under_the_window(
        ladder: list[QuantCandidate]) -> None:
    rec = recommend(ladder, machine("rtx-5080", ram_gib=64), Wishes())
    plan = rec.plan
    ref, why = next((a, w) for a, w in rec.alternatives if "the fastest plan meeting the floors" in w)
    assert plan.estimate.n_ctx_seq >= 2 * CTX_FLOOR > ref.estimate.n_ctx_seq
    assert (1 - SPEED_WINDOW) * ref.predicted.tg_tok_s <= plan.predicted.tg_tok_s < ref.predicted.tg_tok_s
    assert why.startswith("less context")
    # and the native context, more than 10% slower, is shown with why it lost
    assert any(a.estimate.n_ctx_seq == NATIVE_CTX and "more than 10% under the fastest plan" in w
               for a, w in rec.alternatives)


def test_on_a_24gb_card_the_whole_gpu_plan_takes_a_q8_0_cache_for_far_more_context(
        ladder: list[QuantCandidate]) -> None:
    """unsloth's Q4_K_M on a 4090: all on the GPU; q8_0 reaches 201K tokens where f16 reaches 130K at the same speed
    (more context by half an octave outranks an exact cache), and native context would need experts in RAM, more
    than the window's 10% slower."""
    plan = recommend(ladder, machine("rtx-4090", ram_gib=64), Wishes()).plan
    assert plan.flags.n_cpu_moe == 0 and plan.flags.cache_type_k == "q8_0"
    assert 0.75 * NATIVE_CTX <= plan.estimate.n_ctx_seq < NATIVE_CTX
    assert any(f"{NATIVE_CTX} would need --n-cpu-moe" in r and "outside the 10% window" in r for r in plan.reasons)
    assert any(r.startswith("KV cache q8_0: it reaches") and "f16 would reach" in r for r in plan.reasons)


def test_a_floor_given_up_to_fit_is_a_warning_and_the_context_floor_is_kept_first(
        ladder: list[QuantCandidate]) -> None:
    q4 = next(c for c in ladder if c.quant == QUALITY_FLOOR_QUANT)
    rec = recommend(ladder, machine("rtx-5080", ram_gib=3), Wishes())
    assert rec.plan.candidate.quality_rank < q4.quality_rank and rec.plan.estimate.n_ctx_seq >= CTX_FLOOR
    assert len(rec.warnings) == 1 and rec.warnings[0].startswith("no Q4_K_M-class quant fits with 65536 tokens")
    assert rec.policy["quality_floor_met"] is False and rec.policy["ctx_floor_met"] is True
    # nothing reaches the context floor: the most context that fits, said so
    tight = recommend(ladder, machine("none", ram_gib=13.3), Wishes())
    assert tight.plan.estimate.n_ctx_seq < CTX_FLOOR and tight.policy["ctx_floor_met"] is False
    assert tight.warnings[0].startswith("nothing reaches 65536 tokens of context per slot here")


def test_an_asked_quant_or_context_replaces_its_floor_without_a_warning(ladder: list[QuantCandidate]) -> None:
    hw = machine("rtx-5080", ram_gib=64)
    iq4 = recommend(ladder, hw, Wishes(quant="IQ4_XS"))
    assert iq4.plan.quant == "IQ4_XS" and iq4.plan.estimate.n_ctx_seq >= CTX_FLOOR and not iq4.warnings
    short = recommend(ladder, hw, Wishes(ctx_size=32768))
    assert short.plan.estimate.n_ctx_seq == 32768 and not short.warnings
    assert short.plan.candidate.quality_rank >= next(c for c in ladder if c.quant == "Q4_K_M").quality_rank


def test_without_a_gpu_the_default_quantizes_the_kv_cache_only_to_reach_the_floor(
        ladder: list[QuantCandidate]) -> None:
    roomy = recommend(ladder, machine("none", ram_gib=64), Wishes()).plan
    assert roomy.flags.cache_type_k == "f16" and roomy.estimate.n_ctx_seq >= CTX_FLOOR
    tight = recommend(ladder, machine("none", ram_gib=14), Wishes())  # f16 cannot hold 65536 tokens here
    assert tight.plan.flags.cache_type_k != "f16" and tight.plan.estimate.n_ctx_seq >= CTX_FLOOR


def test_the_json_says_which_policy_was_followed(ladder: list[QuantCandidate]) -> None:
    balanced = recommend(ladder, machine("rtx-3090"), Wishes()).to_dict()
    assert balanced["policy"]["name"] == "balanced" and balanced["policy"]["ctx_tiers"] == [65536, 131072, 262144]
    assert balanced["policy"]["rule"] in balanced["reasons"][0] and balanced["warnings"] == []
    speed = recommend(ladder, machine("rtx-3090"), Wishes(prefer="speed")).to_dict()
    assert speed["policy"]["name"] == "speed" and speed["policy"]["rule"] in speed["reasons"][0]


def test_a_busy_machine_gets_fewer_threads_and_a_quiet_one_llama_servers_default(
        ladder: list[QuantCandidate]) -> None:
    quiet = machine("none", ram_gib=64)
    assert threads_for(quiet) == (None, None)
    plan = recommend(ladder, quiet, Wishes()).plan
    assert "--threads" not in plan.command()
    busy = replace(quiet, cpu_busy_logical=12.0)  # 12 of 16 logical CPUs: 6 of 8 cores
    n, why = threads_for(busy)
    assert n == 2 and why is not None and why.startswith("--threads 2: other work keeps 6.0 of this machine's 8")
    plan = recommend(ladder, busy, Wishes()).plan
    command = plan.command()
    assert command[command.index("--threads") + 1] == "2" and why in plan.reasons
    assert threads_for(replace(quiet, cpu_busy_logical=16.0))[0] == 1  # never fewer than one
    assert threads_for(replace(quiet, cpu_busy_logical=0.9))[0] is None  # half a core: not worth a thread
    # a plan wholly on the GPU computes nothing on the CPU: no thread count to pick
    gpu = recommend(ladder, replace(machine("rtx-4090"), cpu_busy_logical=12.0), Wishes(prefer="speed")).plan
    assert gpu.flags.n_cpu_moe == 0 and "--threads" not in gpu.command()

"""Several devices: llama.cpp's placement rules in the estimate (device list, float32 split points, -ot first-match
rules, KV/state/compute per device) and tuner.placement's search (the split and per-device expert spills), held
tight against a brute force over every split that uses only the estimate. The same rules against a real
llama-server are in tests/test_multidevice_vs_llama.py."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from tuner.devices import CPU, Device, layer_devices, model_devices, slot_devices, tensor_placement
from tuner.errors import TunerError
from tuner.estimate import ServerFlags, estimate_memory
from tuner.flags import flags_from_args
from tuner.hardware import GB, Hardware, hardware_for
from tuner.layout import ModelLayout
from tuner.models import QuantCandidate, resolve_candidates
from tuner.placement import (
    NO_PIPELINE_RULE,
    Placer,
    cpu_expert_tensors,
    describe,
    devices_of,
    spill_rules,
)
from tuner.planner import DEFAULT_VRAM_BUFFER_BYTES, Wishes, budget_for, fits, recommend
from tuner.units import GiB, MiB

TWO = ("CUDA0", "CUDA1")
MIXED = ("rtx-3090,rtx-3060", "rtx-4090,rtx-4060-ti")


@pytest.fixture(scope="module")
def ladder() -> dict[str, QuantCandidate]:
    return {c.quant: c for c in resolve_candidates(None)}


def machine(gpu: str, ram_gib: float = 128) -> Hardware:
    return replace(hardware_for(gpu), ram_total_bytes=int(ram_gib * GiB), ram_available_bytes=int(ram_gib * GiB),
                   ram_bandwidth_bytes_s=50 * GB, cpu_physical_cores=8)


def flags_at(ctx: int, **kw: object) -> ServerFlags:
    return ServerFlags(ctx_size=ctx, parallel=1, batch_size=2048, ubatch_size=512, flash_attn="on", **kw)


# ------------------------------------------------------------------------------------------- llama.cpp's rules


def test_split_points_are_float32_as_llama_cpp_computes_them() -> None:
    # 49 blocks, -ts 2,0.7,0.3: slot 45 is 45/50 = 0.9 against the second split point 0.9 (2.7/3): in doubles the
    # point is a hair below 0.9 and the slot goes to the third device; llama.cpp's float32 upper_bound keeps it on
    # the second (checked against llama-server's buffers in tests/test_multidevice_vs_llama.py)
    devs = layer_devices(49, None, ("A", "B", "C"), (2, 0.7, 0.3))
    assert devs[45] == "B"
    assert (devs.count("A"), devs.count("B"), devs.count("C")) == (34, 12, 4)


def test_integer_shares_give_each_device_exactly_its_count() -> None:
    rng = random.Random(11)
    for _ in range(300):
        n_dev = rng.randint(2, 8)
        n_slots = rng.randint(n_dev, 95)
        cuts = sorted(rng.sample(range(n_slots + 1), n_dev - 1))
        counts = [b - a for a, b in zip([0, *cuts], [*cuts, n_slots], strict=True)]
        names = [f"D{i}" for i in range(n_dev)]
        devs = layer_devices(n_slots - 1, None, names, [float(c) for c in counts])
        assert devs == [name for name, c in zip(names, counts, strict=True) for _ in range(c)], counts


def test_partial_ngl_puts_the_first_blocks_on_the_cpu_and_splits_the_rest() -> None:
    devs = layer_devices(8, 5, TWO, (3, 2))
    assert devs == [CPU] * 4 + ["CUDA0"] * 3 + ["CUDA1"] * 2


def test_device_list_follows_device_split_mode_none_and_main_gpu() -> None:
    devices = [Device("CUDA0"), Device("CUDA1"), Device("RPC0[10.0.0.2:50052]", "RPC0", cuda=False, remote=True)]
    assert [d.name for d in model_devices(devices, ServerFlags(device=("CUDA1", "RPC0")))] == \
        ["CUDA1", "RPC0[10.0.0.2:50052]"]
    assert model_devices(devices, ServerFlags(device=("none",))) == ()
    assert [d.name for d in model_devices(devices, ServerFlags(split_mode="none", main_gpu=1))] == ["CUDA1"]
    assert model_devices(devices, ServerFlags(split_mode="none", main_gpu=-1)) == ()
    with pytest.raises(TunerError, match="--main-gpu 3"):
        model_devices(devices, ServerFlags(split_mode="none", main_gpu=3))
    with pytest.raises(TunerError, match="no device CUDA7"):
        model_devices(devices, ServerFlags(device=("CUDA7",)))


@pytest.mark.parametrize(("mode", "why"), [("row", "no split buffer type"), ("tensor", "not sized")])
def test_row_and_tensor_split_modes_are_refused_with_the_reason(ladder: dict[str, QuantCandidate], mode: str,
                                                                why: str) -> None:
    with pytest.raises(TunerError, match=why) as err:
        estimate_memory(ladder["Q4_K_M"].layout, flags_at(8192, split_mode=mode), TWO)
    assert "\n" not in str(err.value)


def test_tensor_split_flag_overrides_the_free_memory_split(ladder: dict[str, QuantCandidate]) -> None:
    lay = ladder["Q4_K_M"].layout
    devs = slot_devices(lay, flags_at(8192, tensor_split=(10.0, 31.0)), TWO, (1.0, 1.0))
    assert devs.count("CUDA0") == 10 and devs.count("CUDA1") == 31 and devs[-1] == "CUDA1"
    # the split of the devices --device keeps (free memory by default), in --device's order
    devs = slot_devices(lay, flags_at(8192, device=("CUDA1", "CUDA0")), TWO, (1.0, 3.0))
    assert devs[0] == "CUDA1" and devs[-1] == "CUDA0" and 30 <= devs.count("CUDA1") <= 31


def test_kv_state_and_output_follow_their_layers_device(ladder: dict[str, QuantCandidate]) -> None:
    lay = ladder["Q4_K_M"].layout
    flags = flags_at(65536, tensor_split=(12.0, 29.0))
    est = estimate_memory(lay, flags, TWO)
    devs = slot_devices(lay, flags, TWO)
    for name in TWO:
        attn = [il for il in lay.attention_layers if devs[il] == name]
        rec = [il for il in lay.recurrent_layers if devs[il] == name]
        assert est.device(name).kv_bytes == 65536 * lay.kv_bytes_per_cell("f16", "f16", attn)
        assert est.device(name).recurrent_bytes == len(rec) * lay.recurrent_bytes_per_layer
    out = [t for t, d in tensor_placement(lay, flags, TWO) if t.layer is None and d != CPU]
    assert out and all(d == "CUDA1" for t, d in tensor_placement(lay, flags, TWO) if t in out)
    # every device has a compute buffer; with no override llama.cpp's pipeline parallelism is on
    assert est.pipeline_parallel and all(est.device(n).compute_bytes > 0 for n in TWO)
    off = estimate_memory(lay, flags.with_(override_tensor=(NO_PIPELINE_RULE,)), TWO)
    assert not off.pipeline_parallel
    assert off.weights_bytes == est.weights_bytes
    for name in (*TWO, CPU):  # 3 more copies of the mask and the inputs, 4 of the block input on each device
        assert off.device(name).compute_bytes < est.device(name).compute_bytes


def test_n_cpu_moe_empties_only_the_first_device(ladder: dict[str, QuantCandidate]) -> None:
    # --n-cpu-moe N sends the experts of blocks 0..N-1 to RAM: all from the first device's range; llama.cpp's own fit
    # spills each device's boundary layers instead (common/fit.cpp:548-588), as tuner.placement does
    lay = ladder["Q4_K_M"].layout
    flags = flags_at(8192, tensor_split=(20.0, 21.0))
    base = estimate_memory(lay, flags, TWO)
    moved = estimate_memory(lay, flags.with_(n_cpu_moe=10), TWO)
    assert {t.layer for t in cpu_expert_tensors(lay, flags.with_(n_cpu_moe=10), TWO)} == set(range(10))
    first10 = sum(b for layer, b in lay.expert_bytes_by_layer().items() if layer < 10)
    assert base.device("CUDA0").weights_bytes - moved.device("CUDA0").weights_bytes == first10
    assert moved.device("CUDA1").weights_bytes == base.device("CUDA1").weights_bytes


def test_override_rules_first_match_wins_and_unknown_buffers_are_refused(ladder: dict[str, QuantCandidate]) -> None:
    lay = ladder["Q4_K_M"].layout
    args = ["-ts", "20,21", "-ot", r"blk\.3\.ffn_down_exps=CUDA1,blk\.3\.ffn_(up|down|gate)_exps=CPU"]
    flags, extra = flags_from_args(args, flags_at(8192))
    assert extra == [] and flags.tensor_split == (20.0, 21.0)
    placed = {t.name: d for t, d in tensor_placement(lay, flags, TWO)}
    assert placed["blk.3.ffn_down_exps.weight"] == "CUDA1"  # the first rule, though the second matches too
    assert placed["blk.3.ffn_up_exps.weight"] == placed["blk.3.ffn_gate_exps.weight"] == CPU
    assert placed["blk.3.ffn_gate_inp.weight"] == "CUDA0"  # the router stays with its layer
    with pytest.raises(TunerError, match="unknown buffer type 'CUDA2'"):
        estimate_memory(lay, flags.with_(override_tensor=(r"blk\.3\.=CUDA2",)), TWO)
    with pytest.raises(TunerError, match="PATTERN=BUFFER_TYPE"):
        ServerFlags(override_tensor=("no-equals-sign",))


def test_spill_rules_name_each_layers_kinds_without_commas(ladder: dict[str, QuantCandidate]) -> None:
    lay = ladder["Q4_K_M"].layout
    experts = {(t.layer, t.name.split(".")[2]): t for t in lay.tensors if t.is_expert}
    chosen = [experts[(5, "ffn_up_exps")], experts[(5, "ffn_gate_exps")], experts[(5, "ffn_down_exps")],
              experts[(9, "ffn_up_exps")], experts[(9, "ffn_gate_exps")], experts[(9, "ffn_down_exps")],
              experts[(30, "ffn_down_exps")]]
    rules = spill_rules(chosen)
    assert rules == (r"blk\.(5|9)\.ffn_(up|down|gate|gate_up)_(ch|)exps=CPU", r"blk\.(30)\.ffn_(down)_(ch|)exps=CPU")
    assert all("," not in r for r in rules)
    got = cpu_expert_tensors(lay, flags_at(8192, override_tensor=rules), TWO)
    assert sorted(t.name for t in got) == sorted(t.name for t in chosen)


# ---------------------------------------------------------------------------------------------- the search


def _budgets(hw: Hardware) -> list[int]:
    return [g.vram_free_bytes - DEFAULT_VRAM_BUFFER_BYTES for g in hw.gpus]


def _overflow(lay: ModelLayout, flags: ServerFlags, devices: list[Device], budgets: list[int]) -> list[int]:
    est = estimate_memory(lay, flags, devices)
    return [est.device(d.name).total_bytes - b for d, b in zip(devices, budgets, strict=True)]


def _fewest_spills_by_brute_force(lay: ModelLayout, flags: ServerFlags, devices: list[Device],
                                  budgets: list[int]) -> int:
    """The fewest expert tensors in RAM over every two-device split, found with the estimate alone: per split, each
    device's fewest (its largest experts first, by bisection), with the other device's experts in RAM meanwhile
    (any spill turns pipeline parallelism off and puts the largest CPU expert in the first GPU's compute buffer)."""
    n_slots = lay.n_layer_all + 1
    best = None
    for n0 in range(n_slots + 1):
        base = flags.with_(tensor_split=(float(n0), float(n_slots - n0)))
        devs = slot_devices(lay, base, devices)
        experts = [t for t in lay.tensors if t.is_expert and t.layer is not None and t.layer < n_slots - 1]
        total = 0
        for d, dev in enumerate(devices):
            mine = sorted((t for t in experts if devs[t.layer] == dev.name), key=lambda t: -t.nbytes)
            others = [t for t in experts if devs[t.layer] != dev.name]

            def over(k: int, d: int = d, mine: list = mine, others: list = others, base: ServerFlags = base) -> int:
                rules = spill_rules(mine[:k] + others) or (NO_PIPELINE_RULE,)
                return _overflow(lay, base.with_(override_tensor=rules), devices, budgets)[d]

            if over(len(mine)) > 0:
                total = -1
                break
            lo, hi = -1, len(mine)  # over(hi) <= 0; over(lo) > 0 unless lo = -1
            while hi - lo > 1:
                mid = (lo + hi) // 2
                lo, hi = (lo, mid) if over(mid) <= 0 else (mid, hi)
            total += hi
        if total >= 0 and (best is None or total < best):
            best = total
    assert best is not None
    return best


@pytest.mark.parametrize("gpus", MIXED)
@pytest.mark.parametrize(("quant", "ctx"), [("Q8_0", 32768), ("Q6_K", 131072), ("Q8_0", 262144),
                                            ("Q4_K_M", 262144)])
def test_placement_is_tight_every_device_in_budget_one_spill_less_does_not_fit(
        ladder: dict[str, QuantCandidate], gpus: str, quant: str, ctx: int) -> None:
    hw = machine(gpus)
    devices, budgets = devices_of(hw), _budgets(hw)
    lay = ladder[quant].layout
    placer = Placer(devices, budgets)
    got = placer.place(lay, flags_at(ctx))
    assert got is not None
    assert all(o <= 0 for o in _overflow(lay, got.flags, devices, budgets)), "every device within its budget"
    assert got.estimate == estimate_memory(lay, got.flags, devices)
    assert sum(got.counts) == lay.n_layer_all + 1 and got.flags.tensor_split == tuple(map(float, got.counts))
    spilled = [t for ts in got.spilled for t in ts]
    assert sorted(t.name for t in spilled) == sorted(t.name for t in cpu_expert_tensors(lay, got.flags, devices))
    # one expert tensor fewer in RAM, any of them, no longer fits on its device
    for t in spilled:  # the no-op rule keeps pipeline parallelism off when the last spill goes
        fewer = got.flags.with_(override_tensor=spill_rules([x for x in spilled if x is not t]) or (NO_PIPELINE_RULE,))
        assert any(o > 0 for o in _overflow(lay, fewer, devices, budgets)), t.name
    # and no other split does with fewer: the search's own answer, and a brute force over every split
    if spilled:
        assert placer.place(lay, flags_at(ctx), max_spills=len(spilled) - 1, allow_partial=False) is None
        assert _fewest_spills_by_brute_force(lay, flags_at(ctx), devices, budgets) == len(spilled)


@pytest.mark.parametrize("gpus", MIXED)
@pytest.mark.parametrize("prefer", ["speed", "balanced", "quality"])
def test_mixed_gpus_plan_a_tensor_split_with_every_device_in_budget_and_tight(
        ladder: dict[str, QuantCandidate], gpus: str, prefer: str) -> None:
    hw = machine(gpus)
    rec = recommend(list(ladder.values()), hw, Wishes(prefer=prefer))
    plan = rec.plan
    devices, budgets = devices_of(hw), _budgets(hw)
    lay = plan.candidate.layout
    n_slots = lay.n_layer_all + 1
    assert plan.flags.tensor_split and sum(plan.flags.tensor_split) == n_slots
    assert all(v == int(v) for v in plan.flags.tensor_split)
    args = plan.command()
    assert args[args.index("--tensor-split") + 1] == ",".join(str(int(v)) for v in plan.flags.tensor_split)
    assert fits(plan.estimate, plan.budget)
    assert plan.estimate == estimate_memory(lay, plan.flags, devices)
    assert all(o <= 0 for o in _overflow(lay, plan.flags, devices, budgets))
    spilled = cpu_expert_tensors(lay, plan.flags, devices)
    for t in spilled:  # one fewer in RAM does not fit (the no-op rule keeps pipeline parallelism off, as the plan has)
        fewer = plan.flags.with_(override_tensor=spill_rules([x for x in spilled if x is not t]) or (NO_PIPELINE_RULE,))
        assert any(o > 0 for o in _overflow(lay, fewer, devices, budgets)), t.name
    counts = [int(v) for v in plan.flags.tensor_split]
    order = list(plan.flags.device) or [d.device_name for d in devices]
    by_name = {d.device_name: g for d, g in zip(devices, hw.gpus, strict=True)}
    if plan.estimate.n_ctx_seq < lay.n_ctx_train:
        # 256 more tokens of context overflow some device: this split, and every other split of the same spills
        for first in range(1, n_slots):
            split = (float(first), float(n_slots - first))
            bigger = plan.flags.with_(ctx_size=plan.estimate.n_ctx_seq + 256, tensor_split=split)
            assert any(o > 0 for o in _overflow(lay, bigger, devices, budgets)), split
    else:
        assert plan.estimate.n_ctx_seq == lay.n_ctx_train
    if not spilled and prefer != "quality":
        # nothing in RAM at the final context: the faster card holds all it can, one more layer there overflows
        fast = max(range(len(order)), key=lambda i: by_name[order[i]].mem_bandwidth_bytes_s)
        slow = 1 - fast
        assert counts[slow] > 0
        moved = counts.copy()
        moved[fast] += 1
        moved[slow] -= 1
        more = plan.flags.with_(tensor_split=tuple(float(c) for c in moved))
        assert any(o > 0 for o in _overflow(lay, more, devices, budgets)), moved
    rows = describe(lay, plan.flags, devices, budgets)
    assert [r.slots for r in rows] == [int(v) for v in plan.flags.tensor_split]
    assert all(r.budget_bytes is not None and r.total_bytes <= r.budget_bytes for r in rows)
    assert sum(r.expert_tensors_in_ram for r in rows) == len(spilled)


def test_two_equal_gpus_and_one_gpu_keep_their_plans(ladder: dict[str, QuantCandidate]) -> None:
    one = recommend(list(ladder.values()), machine("rtx-3090"), Wishes(quant="Q8_0")).plan
    assert one.flags.n_cpu_moe > 0 and not one.flags.tensor_split and not one.flags.override_tensor
    two = recommend(list(ladder.values()), machine("2xrtx-3090"), Wishes(quant="Q8_0")).plan
    assert two.flags.tensor_split and two.flags.n_cpu_moe == 0
    assert fits(two.estimate, two.budget)


def test_without_room_for_pipeline_parallelism_a_no_op_override_turns_it_off(
        ladder: dict[str, QuantCandidate]) -> None:
    hw = machine("rtx-4090,rtx-4060-ti")
    devices, budgets = devices_of(hw), _budgets(hw)
    lay = ladder["Q8_0"].layout
    got = Placer(devices, budgets).place(lay, flags_at(122880))
    assert got is not None and got.n_spilled == 0
    assert got.flags.override_tensor == (NO_PIPELINE_RULE,) and not got.estimate.pipeline_parallel
    pipelined = got.flags.with_(override_tensor=())
    assert any(o > 0 for o in _overflow(lay, pipelined, devices, budgets))


def test_when_even_every_expert_in_ram_does_not_fit_leading_blocks_go_to_the_cpu(
        ladder: dict[str, QuantCandidate]) -> None:
    devices = [Device("CUDA0"), Device("CUDA1")]
    budgets = [700 * MiB, 700 * MiB]  # not even the dense part of every layer: blocks go to the CPU
    lay = ladder["Q4_K_M"].layout
    got = Placer(devices, budgets).place(lay, flags_at(8192))
    assert got is not None and got.flags.cpu_moe and got.flags.n_gpu_layers is not None
    assert all(o <= 0 for o in _overflow(lay, got.flags, devices, budgets))
    # one more slot on the GPUs overflows, unless every slot (the blocks and the output layer) is on them already
    n_slots = lay.n_layer_all + 1
    assert got.flags.n_gpu_layers < n_slots  # all on the GPUs would be the spill modes, which did not fit
    more = got.flags.with_(n_gpu_layers=got.flags.n_gpu_layers + 1)
    assert any(o > 0 for o in _overflow(lay, more, devices, budgets))


def test_budget_lists_every_device_in_json() -> None:
    hw = machine("rtx-3090,rtx-3060")
    d = budget_for(hw, Wishes()).to_dict()
    assert d["devices"] == [
        {"device": "CUDA0", "vram_total_bytes": hw.gpus[0].vram_total_bytes,
         "vram_free_bytes": hw.gpus[0].vram_free_bytes, "buffer_bytes": DEFAULT_VRAM_BUFFER_BYTES},
        {"device": "CUDA1", "vram_total_bytes": hw.gpus[1].vram_total_bytes,
         "vram_free_bytes": hw.gpus[1].vram_free_bytes, "buffer_bytes": DEFAULT_VRAM_BUFFER_BYTES}]


@pytest.mark.parametrize("gpus", MIXED)
@pytest.mark.parametrize("quant", ["Q4_K_M", "Q5_K_M", "Q6_K"])
def test_at_the_final_context_the_faster_card_takes_every_layer_it_can_hold(
        ladder: dict[str, QuantCandidate], gpus: str, quant: str) -> None:
    hw = machine(gpus)
    plan = recommend([ladder[quant]], hw, Wishes()).plan
    devices, budgets = devices_of(hw), _budgets(hw)
    lay = plan.candidate.layout
    assert hw.gpus[0].mem_bandwidth_bytes_s > hw.gpus[1].mem_bandwidth_bytes_s
    assert plan.estimate.n_ctx_seq == lay.n_ctx_train  # these fit at the model's maximum: the split is for speed
    rows = describe(lay, plan.flags, devices, budgets)
    assert rows[-1].name == "CUDA0" and rows[-1].output_layer  # the faster card holds the output layer (last slot)
    assert all(o <= 0 for o in _overflow(lay, plan.flags, devices, budgets))
    slow, fast = (int(v) for v in plan.flags.tensor_split)
    if slow:  # one more layer on the faster card does not fit there
        assert plan.flags.device == ("CUDA1", "CUDA0")
        moved = plan.flags.with_(tensor_split=(float(slow - 1), float(fast + 1)))
        assert _overflow(lay, moved, devices, budgets)[0] > 0
    # llama.cpp's own order (the faster card first, the output layer on the slower) predicts slower
    natural = Placer(devices, budgets).place(lay, plan.flags.with_(device=(), tensor_split=()), speed=True)
    assert natural is not None
    from tuner.speed import predict_speed

    assert predict_speed(lay, natural.flags, hw).tg_tok_s <= plan.predicted.tg_tok_s


def test_a_calibrations_corrections_size_the_search_and_its_result(ladder: dict[str, QuantCandidate]) -> None:
    """A calibration scales each device's compute buffer (tuner.corrections): the search sizes with it, and every
    device of the plan fits once corrected, which it would not all do uncorrected with the same spills."""
    hw = machine("rtx-3090,rtx-3060")
    devices, budgets = devices_of(hw), _budgets(hw)
    lay = ladder["Q8_0"].layout

    def correct(est):  # type: ignore[no-untyped-def]  # every GPU's compute buffer x2.5
        return replace(est, devices=tuple(replace(d, compute_bytes=int(d.compute_bytes * 2.5)) if d.name != CPU
                                          else d for d in est.devices))

    plain = Placer(devices, budgets).place(lay, flags_at(65536))
    scaled = Placer(devices, budgets).place(lay, flags_at(65536), correct=correct)
    assert plain is not None and scaled is not None
    assert scaled.n_spilled > plain.n_spilled
    assert scaled.estimate == correct(estimate_memory(lay, scaled.flags, devices))
    assert all(scaled.estimate.device(d.name).total_bytes <= b for d, b in zip(devices, budgets, strict=True))

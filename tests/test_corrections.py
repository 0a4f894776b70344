"""tuner.corrections: the correction model (compute scaled per device model, shape and ubatch; uncounted GPU memory
into the buffer; speeds scaled per placement), applied to the planner's and tuner estimate's figures; the
calibration file format; NVML's process memory turned into uncounted bytes."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from tuner.calibration import check_gpus_idle, ladder
from tuner.calibration_file import export_document, read_document, shipped_points
from tuner.corrections import (
    CALIBRATED_MARGIN_BYTES,
    Calibration,
    MemoryPoint,
    SpeedPoint,
    corrected_estimate,
    cpu_device,
    hardware_label,
    memory_points,
    placement_class,
    point_from_dict,
    shape_id,
)
from tuner.errors import TunerError
from tuner.estimate import estimate_memory
from tuner.flags import ServerFlags
from tuner.hardware import Hardware, detect_hardware, hardware_for
from tuner.hardware.snapshot import SnapshotNvml
from tuner.models import resolve_candidates, resolve_layout
from tuner.planner import DEFAULT_VRAM_BUFFER_BYTES, Wishes, budget_for, plan_for
from tuner.serve import gpu_process_bytes, nvml_view
from tuner.serverlog import parse_load_log
from tuner.speed import predict_on
from tuner.units import MiB

NVML_DATA = Path(__file__).parent / "data" / "nvml"
CARD = "qwen3.5-35b-a3b:Q4_K_M"
RTX4090 = "NVIDIA GeForce RTX 4090"


@pytest.fixture(scope="module")
def layout():  # type: ignore[no-untyped-def]
    return resolve_layout(CARD)


@pytest.fixture(scope="module")
def gpu() -> Hardware:
    return hardware_for("rtx-4090")


def point(layout, hardware: Hardware, flags: ServerFlags, ratio: float, *, n: int = 0,  # type: ignore[no-untyped-def]
          process_extra: int | None = None, origin: str = "this machine", device: str = "CUDA0") -> MemoryPoint:
    """A memory point of ``flags`` whose reported compute buffer is ``ratio`` × the pure estimate's."""
    est = corrected_estimate(layout, flags, hardware)
    d = est.device(device)
    reported = {"weights": d.weights_bytes, "kv": d.kv_bytes, "recurrent": d.recurrent_bytes,
                "compute": round(d.compute_bytes * ratio)}
    process = None if process_extra is None else sum(reported.values()) + process_extra
    model = RTX4090 if device != "CPU" else cpu_device(hardware.cpu_model)
    return MemoryPoint(id=f"t:{n}:{device}", device=model, build="abc1234", cuda=device != "CPU",
                       shape=shape_id(layout), n_ubatch=est.n_ubatch, flags=tuple(flags.to_args()),
                       predicted={"compute": d.compute_bytes, "weights": d.weights_bytes}, reported=reported,
                       process_bytes=process, source="calibrate", observed_at=f"2026-01-01T00:00:0{n}",
                       origin=origin)


FLAGS = ServerFlags(ctx_size=32768, parallel=1, flash_attn="on")


def test_the_compute_buffer_is_scaled_by_the_median_reported_over_predicted(layout, gpu: Hardware) -> None:
    pts = tuple(point(layout, gpu, FLAGS.with_(ctx_size=c), r, n=i)
                for i, (c, r) in enumerate([(4096, 1.20), (32768, 1.25), (65536, 1.40)]))
    cal = Calibration(memory=pts)
    pure = estimate_memory(layout, FLAGS, ["CUDA0"])
    got = corrected_estimate(layout, FLAGS, gpu, cal)
    assert got.device("CUDA0").compute_bytes == round(pure.device("CUDA0").compute_bytes * 1.25)
    for kind in ("weights_bytes", "kv_bytes", "recurrent_bytes"):  # llama.cpp's arithmetic: never corrected
        assert getattr(got.device("CUDA0"), kind) == getattr(pure.device("CUDA0"), kind)
    assert got.device("CPU").compute_bytes == pure.device("CPU").compute_bytes, "a GPU run's host is not corrected"
    assert any("calibrated by 3 runs (this shape and ubatch" in n for n in got.notes)
    assert corrected_estimate(layout, FLAGS, gpu) == pure, "no calibration: the pure estimate"


def test_scopes_fall_back_from_shape_and_ubatch_to_shape_to_other_shapes(layout, gpu: Hardware) -> None:
    cal = Calibration(memory=(point(layout, gpu, FLAGS, 1.10, n=0),
                              point(layout, gpu, FLAGS.with_(ubatch_size=2048, batch_size=2048), 1.50, n=1)))
    assert cal.device(RTX4090, shape_id(layout), 512).compute_scale == pytest.approx(1.10, rel=1e-6)
    assert cal.device(RTX4090, shape_id(layout), 2048).compute_scale == pytest.approx(1.50, rel=1e-6)
    at_1024 = cal.device(RTX4090, shape_id(layout), 1024)
    assert at_1024.scope == "this shape" and at_1024.compute_scale == pytest.approx(1.30, rel=1e-6)
    other = cal.device(RTX4090, "qwen35-64L-5120e-00000000", 512)
    assert other.scope == "other shapes" and other.compute_runs == 2
    assert cal.device("NVIDIA GeForce RTX 3090", shape_id(layout), 512) is None


def test_uncounted_gpu_memory_sets_the_buffer_only_when_measured_on_this_machine(layout, gpu: Hardware) -> None:
    measured = Calibration(memory=(point(layout, gpu, FLAGS, 1.0, n=0, process_extra=300 * MiB),
                                   point(layout, gpu, FLAGS, 1.0, n=1, process_extra=420 * MiB)))
    budget = budget_for(gpu, Wishes(), measured)
    assert budget.buffer_bytes == 420 * MiB + CALIBRATED_MARGIN_BYTES < DEFAULT_VRAM_BUFFER_BYTES
    assert "calibrated on this machine by 2 runs" in budget.buffer_source
    assert budget_for(gpu, Wishes(buffer_bytes=2 * 1024 * MiB), measured).buffer_bytes == 2 * 1024 * MiB, \
        "--buffer wins"
    shipped = Calibration(memory=tuple(replace(p, origin="shipped x.json") for p in measured.memory))
    assert budget_for(gpu, Wishes(), shipped).buffer_bytes == DEFAULT_VRAM_BUFFER_BYTES, \
        "another machine's CUDA context does not shrink this one's buffer"
    two = hardware_for("rtx-4090x2")
    assert budget_for(two, Wishes(), measured).buffer_bytes == 420 * MiB + CALIBRATED_MARGIN_BYTES
    mixed = replace(two, gpus=(two.gpus[0], replace(two.gpus[1], name="NVIDIA GeForce RTX 3090")))
    assert budget_for(mixed, Wishes(), measured).buffer_bytes == DEFAULT_VRAM_BUFFER_BYTES, "every GPU measured"


def test_recommend_says_calibrated_on_this_machine_and_keeps_the_smaller_buffer(layout, gpu: Hardware) -> None:
    cal = Calibration(memory=(point(layout, gpu, FLAGS, 1.05, n=0, process_extra=350 * MiB),))
    plain = plan_for(CARD, gpu, Wishes())
    rec = plan_for(CARD, gpu, Wishes(), calibration=cal)
    assert rec.plan.budget.buffer_bytes == 350 * MiB + CALIBRATED_MARGIN_BYTES
    assert plain.plan.budget.buffer_bytes == DEFAULT_VRAM_BUFFER_BYTES
    doc = rec.to_dict()
    assert doc["calibration"]["line"] == "calibrated on this machine by 1 run"
    assert doc["calibration"]["devices"]["CUDA0"]["compute_scale"] == pytest.approx(1.05, abs=1e-3)
    assert any(r.startswith("calibrated on this machine by 1 run") for r in doc["reasons"])
    assert any("350.0 MiB of CUDA context and pools measured" in r for r in doc["reasons"])
    assert plain.to_dict()["calibration"] is None
    compute = rec.plan.estimate.device("CUDA0").compute_bytes
    pure = estimate_memory(layout, rec.plan.flags, ["CUDA0"]).device("CUDA0").compute_bytes
    scale = cal.device(RTX4090, shape_id(layout), rec.plan.estimate.n_ubatch).compute_scale
    assert compute == round(pure * scale) and scale == pytest.approx(1.05, rel=1e-6)


def speed(hardware: Hardware, layout, flags: ServerFlags, tg: float, pp: float, n: int) -> SpeedPoint:  # type: ignore[no-untyped-def]
    pred = predict_on(layout, flags, hardware, depth_tokens=1)
    return SpeedPoint(id=f"s:{n}:d0", hardware=hardware_label(hardware), build="abc1234", cuda=True,
                      shape=shape_id(layout), placement=placement_class(layout, flags, hardware),
                      flags=tuple(flags.to_args()), depth=0, tg_tok_s=pred.tg_tok_s * tg,
                      pp_tok_s=pred.pp_tok_s * pp, tg_predicted_tok_s=pred.tg_tok_s,
                      pp_predicted_tok_s=pred.pp_tok_s)


def test_speed_is_scaled_per_placement_then_over_all(layout, gpu: Hardware) -> None:
    cal = Calibration(speed=(speed(gpu, layout, FLAGS, 1.3, 0.8, 0), speed(gpu, layout, FLAGS, 1.5, 0.6, 1),
                             speed(gpu, layout, FLAGS.with_(n_cpu_moe=20), 0.5, 2.0, 2)))
    base = predict_on(layout, FLAGS, gpu)
    got = cal.rescale(base, layout, FLAGS, gpu)
    assert got.source == "calibrated"
    assert got.tg_tok_s == pytest.approx(base.tg_tok_s * 1.4) and got.pp_tok_s == pytest.approx(base.pp_tok_s * 0.7)
    offload = FLAGS.with_(n_cpu_moe=30)
    assert cal.rescale(predict_on(layout, offload, gpu), layout, offload, gpu).tg_tok_s == pytest.approx(
        predict_on(layout, offload, gpu).tg_tok_s * 0.5), "experts in RAM: its own scale"
    other = hardware_for("rtx-3090")
    assert cal.rescale(predict_on(layout, FLAGS, other), layout, FLAGS, other).source == "roofline"
    assert cal.rescale(replace(base, source="measured"), layout, FLAGS, gpu).source == "measured"
    only_offload = Calibration(speed=cal.speed[2:])
    assert only_offload.speed_scale(gpu, "gpu").scope == "all placements"


def test_placement_classes() -> None:
    lay = resolve_layout(CARD)
    gpu, cpu = hardware_for("rtx-4090"), hardware_for("none")
    assert placement_class(lay, FLAGS, gpu) == "gpu"
    assert placement_class(lay, FLAGS.with_(n_cpu_moe=4), gpu) == "experts_in_ram"
    assert placement_class(lay, FLAGS.with_(n_gpu_layers=20), gpu) == "layers_on_cpu"
    assert placement_class(lay, FLAGS, cpu) == placement_class(lay, FLAGS.with_(n_gpu_layers=0), gpu) == "cpu"


def test_points_round_trip_and_unknown_kinds_are_skipped(layout, gpu: Hardware) -> None:
    p = point(layout, gpu, FLAGS, 1.1, n=3, process_extra=1)
    assert point_from_dict(json.loads(json.dumps(p.to_dict()))) == p
    s = speed(gpu, layout, FLAGS, 1.0, 1.0, 4)
    assert point_from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert point_from_dict({"kind": "other"}) is None
    assert point_from_dict({"kind": "memory", "n_ubatch": "x"}) is None


def test_the_calibration_file_reads_back_has_no_paths_and_refuses_other_versions(layout, gpu: Hardware,
                                                                               tmp_path: Path) -> None:
    pts = [point(layout, gpu, FLAGS, 1.2, n=0, process_extra=400 * MiB), speed(gpu, layout, FLAGS, 0.9, 1.1, 1)]

    class Build:
        commit, cuda = "abc1234", True

    doc = export_document(pts, hardware=gpu, build=Build(), shapes={shape_id(layout): {"arch": "qwen35moe"}},
                          created_at="2026-01-01T00:00:00+00:00", tuner_version="0.1.0")
    blob = json.dumps(doc)
    assert "/" not in blob.replace(" / ", ""), "no paths"
    assert doc["summary"]["devices"]["CUDA0"]["uncounted_bytes"] == 400 * MiB
    back = read_document(json.loads(blob), origin="shipped t.json")
    assert [p.origin for p in back] == ["shipped t.json"] * 2
    assert [replace(p, origin="this machine") for p in back] == pts
    with pytest.raises(TunerError, match="version 2"):
        read_document({**doc, "version": 2}, origin="x")
    with pytest.raises(TunerError, match="not a tuner calibration file"):
        read_document({"points": []}, origin="x")
    good = tmp_path / "good.json"
    good.write_text(blob)
    (tmp_path / "broken.json").write_text("{not json")
    assert len(shipped_points([good, tmp_path / "broken.json"])) == 2, "a broken shipped file is skipped"


@pytest.mark.parametrize(("text", "problem"), [
    ('{"format": "tuner-calibration", "version": 1, "points": [{"kind": "speed", "depth": 1e400}]}',
     r"is not JSON \(the number 1e400 is out of range\)"),
    ('{"format": "tuner-calibration", "version": 1, "points": [{"kind": "speed", "depth": "deep"}]}',
     r"is not a valid calibration file \(points\[0\]\.depth: 'deep', expected a whole number"),
    ('{"format": "tuner-calibration", "version": 1, "points": [{"kind": "memory", "n_ubatch": -1}]}',
     r"is not a valid calibration file \(points\[0\]\.n_ubatch: -1, expected"),
    ('{"format": "tuner-calibration", "version": 1, "points": ["x"]}',
     r"is not a valid calibration file \(points\[0\]: 'x', expected an object"),
    ('{"format": "tuner-calibration", "version": "' + "9" * 100_000 + '"}',
     r"is a calibration file of version '9{30,}…; this tuner reads version 1"),
])
def test_a_bad_calibration_file_is_skipped_with_one_line_naming_it(tmp_path: Path, text: str, problem: str) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text(text)
    skipped: list[str] = []
    assert shipped_points([bad], on_skip=skipped.append) == []
    assert len(skipped) == 1 and len(skipped[0]) < 400, skipped
    assert re.match(rf"skipped the calibration file {re.escape(str(bad))} {problem}.*; delete or replace the file$",
                    skipped[0]), skipped[0]


def test_a_point_of_a_kind_this_tuner_does_not_know_is_skipped_not_refused(tmp_path: Path) -> None:
    doc = {"format": "tuner-calibration", "version": 1, "points": [{"kind": "energy", "joules": 5}]}
    assert read_document(doc, origin="x") == []


def test_shipped_calibrations_apply_where_this_machine_has_none(layout, gpu: Hardware, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.paths import catalog_dir
    from tuner.profile_store import ProfileStore, load_calibration

    catalogs = tmp_path / "catalogs"
    shutil.copytree(catalog_dir(), catalogs)
    (catalogs / "calibrations").mkdir(exist_ok=True)

    class Build:
        commit, cuda = "abc1234", True

    doc = export_document([point(layout, gpu, FLAGS, 1.3, n=0, process_extra=600 * MiB)], hardware=gpu,
                          build=Build(), shapes={}, created_at="2026-01-01T00:00:00+00:00", tuner_version="0.1.0")
    (catalogs / "calibrations" / "rtx-4090.json").write_text(json.dumps(doc))
    monkeypatch.setenv("TUNER_CATALOG_DIR", str(catalogs))
    monkeypatch.setenv("TUNER_CONFIG_DIR", str(tmp_path / "config"))
    cal = load_calibration(gpu, Build())
    assert cal.describe(gpu) == "calibrated from shipped rtx-4090.json by 1 run"
    assert load_calibration(hardware_for("rtx-3090"), Build()).memory == ()
    store = ProfileStore()
    store.add_points([point(layout, gpu, FLAGS, 1.1, n=1)])
    mine = load_calibration(gpu, Build(), store=store)
    assert [p.origin for p in mine.memory] == ["this machine"], "this machine's own points come first"
    assert load_calibration(gpu, type("B", (), {"commit": "fffffff", "cuda": True})(), store=store).memory[0] \
        .origin == "shipped rtx-4090.json", "another build's local points do not apply"


# ------------------------------------------------------------------------------------------------ NVML


def test_uncounted_memory_is_nvmls_process_memory_less_every_reported_buffer(layout) -> None:
    nvml = SnapshotNvml(NVML_DATA / "rtx4090_driver550.json")
    hardware = detect_hardware(nvml)
    log = ("load_tensors:        CUDA0 model buffer size = 18000.00 MiB\n"
           "load_tensors:   CPU_Mapped model buffer size =   500.00 MiB\n"
           "llama_kv_cache:      CUDA0 KV buffer size =   640.00 MiB\n"
           "llama_memory_recurrent:      CUDA0 RS buffer size =    62.81 MiB\n"
           "sched_reserve:      CUDA0 compute buffer size =   493.00 MiB\n"
           "sched_reserve:  CUDA_Host compute buffer size =    12.00 MiB\n")
    reported = parse_load_log(log)
    view = nvml_view(48213, [0], {0: 25_000_000_000}, nvml)
    process = gpu_process_bytes(view, hardware)
    assert process == {"CUDA0": 20418920448}
    est = corrected_estimate(layout, FLAGS, hardware)
    (p,) = memory_points(id_prefix="x", estimate=est, reported={k: dict(reported.by_kind(k)) for k in
                                                               ("weights", "kv", "recurrent", "compute")},
                         layout=layout, flags=FLAGS, hardware=hardware, build="abc", cuda=True, process_bytes=process,
                         source="serve", observed_at="")
    assert p.device == RTX4090 and p.driver == "550.120"
    buffers = sum(reported.total(k, "CUDA0") for k in ("weights", "kv", "recurrent", "compute"))
    assert p.uncounted_bytes == 20418920448 - buffers
    assert 250 * MiB < p.uncounted_bytes < 300 * MiB


def test_calibrate_refuses_a_gpu_another_process_holds_most_of() -> None:
    nvml = SnapshotNvml(NVML_DATA / "rtx4090_driver550.json")  # a llama-server holds 19.0 of 24.0 GiB
    hardware = detect_hardware(nvml)
    with pytest.raises(TunerError) as err:
        check_gpus_idle(hardware, nvml)
    line = err.value.one_line()
    assert "\n" not in line and line.startswith("GPU 0 (NVIDIA GeForce RTX 4090) is busy: 19.4")
    idle = json.loads((NVML_DATA / "rtx4090_driver550.json").read_text())
    idle["devices"][0]["memory"].update(free=25_000_000_000, used=757_220_864)
    check_gpus_idle(hardware, SnapshotNvml(idle))  # no error
    check_gpus_idle(hardware_for("rtx-4090"), nvml)  # a catalog card is not this machine's: nothing to check


def test_the_ladder_varies_context_kv_ubatch_and_experts_in_ram(layout, gpu: Hardware) -> None:
    quick, skipped = ladder(layout, gpu, budget_for(gpu, Wishes()), quick=True)
    assert [r.name for r in quick] == ["ctx4096-f16", "ctx32768-f16", "ctx32768-q8_0", "ctx4096-ubatch2048",
                                       f"ctx4096-moe-cpu{quick[0].flags.n_cpu_moe + 10}"]
    assert skipped == []
    assert {r.flags.to_args()[r.flags.to_args().index("--cache-ram") + 1] for r in quick} == {"0"}
    full, _ = ladder(layout, gpu, budget_for(gpu, Wishes()), quick=False)
    assert len(full) > len(quick) and any(r.name == "ctx65536-q8_0" for r in full)
    assert any(r.name.endswith(f"moe-cpu{layout.n_layer}") for r in full)
    cpu = hardware_for("none")
    rungs, _ = ladder(layout, cpu, budget_for(cpu, Wishes()), quick=True)
    assert all(r.flags.n_gpu_layers == 0 and "ncmoe" not in r.name for r in rungs)
    small = replace(hardware_for("rtx-3060"), ram_available_bytes=64 * 1024 * MiB)
    placed, _ = ladder(layout, small, budget_for(small, Wishes()), quick=True)
    assert placed[0].flags.n_cpu_moe > 0 and "to fit" in placed[0].why
    big = resolve_candidates("qwen3.5-122b-a10b:Q4_K_M")[0].layout
    tight = replace(cpu, ram_available_bytes=8 * 1024 * MiB)
    none_fit, lines = ladder(big, tight, budget_for(tight, Wishes()), quick=True)
    assert none_fit == [] and len(lines) == 4 and all("does not fit here" in x for x in lines)

"""The vision projector: its weights and warm-up compute buffer in the estimate, against a live llama-server's log,
on the GPU or the CPU, and ``recommend --vision`` counting it (and ``--no-mmproj`` without it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tuner.cli import main
from tuner.devices import projector_device
from tuner.errors import TunerError
from tuner.estimate import ServerFlags, estimate_memory
from tuner.gguf_file import read_gguf
from tuner.hardware import hardware_for
from tuner.models import local_layout
from tuner.planner import Wishes, plan_for
from tuner.server import LlamaServer
from tuner.serverlog import parse_load_log
from tuner.synth import (
    MmprojSpec,
    SynthSpec,
    qwen35_mmproj_spec,
    write_synthetic_gguf,
    write_synthetic_mmproj,
)
from tuner.units import MiB
from tuner.vision import Projector, projector_from_file_size, projector_from_header

# Two small encoders whose largest graph stage differs: the input image (A), an attention block (C).
ENCODERS = {"a": MmprojSpec(), "c": MmprojSpec(n_layer=2, n_embd=256, n_ff=256, n_head=2)}


@pytest.fixture(scope="module")
def vision_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with a tiny text model (n_embd 64), its projectors, and one projector of Qwen3.5's shape."""
    d = tmp_path_factory.mktemp("vision")
    write_synthetic_gguf(d / "tiny-F16.gguf", SynthSpec(name="tiny-vision"))
    for name, spec in ENCODERS.items():
        write_synthetic_mmproj(d / "proj" / f"mmproj-{name}.gguf", spec)
    write_synthetic_mmproj(d / "mmproj-F16.gguf", MmprojSpec())
    return d


def test_a_projector_is_its_tensors_and_a_warmup_buffer_from_its_header(tmp_path: Path) -> None:
    path = write_synthetic_mmproj(tmp_path / "mmproj-qwen35.gguf", qwen35_mmproj_spec())
    header = read_gguf(path)
    p = projector_from_header(header)
    assert p.from_header and p.projector_type == "qwen3vl_merger"
    assert p.weights_bytes == header.tensor_bytes == 899_263_424  # 857.60 MiB, what clip.cpp logs as model size
    assert p.warmup_patches == 46 * 46 * 4 == 8464 and p.max_patches == 4096 * 4
    # the CPU backend's reservations for this encoder (llama-server -lv 4): 248.10 MiB, 4657.81 MiB without FA
    assert abs(p.compute_bytes(True) / (248.10 * MiB) - 1) < 0.02
    assert abs(p.compute_bytes(False) / (4657.81 * MiB) - 1) < 0.02
    assert p.compute_bytes(True, p.max_patches) > p.compute_bytes(True) and p.growth_bytes() > 0
    by_size = projector_from_file_size("x.gguf", path.stat().st_size)
    assert by_size.compute_bytes(True) == p.compute_bytes(True)  # Qwen3.5's encoder is the default shape
    assert 0 < by_size.weights_bytes - p.weights_bytes < 64 * 1024  # the file's header, counted as weights


def test_a_model_file_is_not_a_projector(vision_dir: Path) -> None:
    with pytest.raises(TunerError, match="not a vision projector"):
        projector_from_header(read_gguf(vision_dir / "tiny-F16.gguf"))


def _load(server_bin: Path, model: Path, args: list[str]) -> str:
    with LlamaServer(server_bin, model, ["-lv", "4", "--fit", "off", "-t", "2", *args]) as server:
        server.wait_ready(300)
        text = server.log_text()
    server.cleanup_log()
    return text


@pytest.mark.server
@pytest.mark.parametrize("name", sorted(ENCODERS))
@pytest.mark.parametrize("fa", ["on", "off"])
def test_the_projectors_memory_matches_llama_servers_log(server_bin: Path, vision_dir: Path, name: str,
                                                         fa: str) -> None:
    mmproj = vision_dir / "proj" / f"mmproj-{name}.gguf"
    flags = ServerFlags(ctx_size=1024, parallel=1, flash_attn=fa)
    reported = parse_load_log(_load(server_bin, vision_dir / "tiny-F16.gguf",
                                    [*flags.to_args(), "--mmproj", str(mmproj)]))
    projector = projector_from_header(read_gguf(mmproj))
    est = estimate_memory(local_layout(vision_dir / "tiny-F16.gguf"), flags, vision=projector)
    parts = {b.part: b.bytes for b in reported.buffers if b.kind == "vision"}
    assert abs(parts["weights"] - projector.weights_bytes) <= MiB // 200  # "model size", two decimals of MiB
    assert abs(parts["compute"] / projector.compute_bytes(fa == "on") - 1) < 0.02, (parts, projector)
    assert reported.vision == {"CPU": parts["weights"] + parts["compute"]}
    assert abs(est.host.vision_bytes / reported.total("vision") - 1) < 0.02
    # the text model's own buffers are untouched by the projector's lines
    assert reported.total("weights") == pytest.approx(est.weights_bytes, abs=MiB // 100)


def test_the_projector_sits_on_the_first_gpu_or_the_cpu_without_offload(vision_dir: Path) -> None:
    layout = local_layout(vision_dir / "tiny-F16.gguf")
    p = projector_from_header(read_gguf(vision_dir / "mmproj-F16.gguf"))
    flags = ServerFlags(ctx_size=1024, parallel=1)
    on_gpu = estimate_memory(layout, flags, ["CUDA0", "CUDA1"], vision=p)
    assert on_gpu.device("CUDA0").vision_bytes == p.total_bytes() and on_gpu.host.vision_bytes == 0
    assert on_gpu.device("CUDA1").vision_bytes == 0 and on_gpu.vision and on_gpu.vision["device"] == "CUDA0"
    on_cpu = estimate_memory(layout, flags, ["CUDA0"], vision=p, mmproj_offload=False)
    assert on_cpu.host.vision_bytes == p.total_bytes() and on_cpu.device("CUDA0").vision_bytes == 0
    one_gpu = estimate_memory(layout, flags, ["CUDA0"], vision=p)
    assert on_cpu.total_bytes == one_gpu.total_bytes and one_gpu.device("CUDA0").vision_bytes == p.total_bytes()


def test_the_projector_follows_the_first_device_entry_and_none_keeps_it_on_the_cpu(vision_dir: Path) -> None:
    # common/arg.cpp:889-893: with --device, the projector's device is its first entry; "none" is no device
    layout = local_layout(vision_dir / "tiny-F16.gguf")
    p = projector_from_header(read_gguf(vision_dir / "mmproj-F16.gguf"))
    flags = ServerFlags(ctx_size=1024, parallel=1)
    gpus = ["CUDA0", "CUDA1"]
    swapped = estimate_memory(layout, flags.with_(device=("CUDA1", "CUDA0")), gpus, vision=p)
    assert swapped.vision and swapped.vision["device"] == "CUDA1"
    assert swapped.device("CUDA1").vision_bytes == p.total_bytes() and swapped.device("CUDA0").vision_bytes == 0
    only = estimate_memory(layout, flags.with_(device=("CUDA1",), split_mode="none"), gpus, vision=p)
    assert only.vision and only.vision["device"] == "CUDA1"
    none = estimate_memory(layout, flags.with_(device=("none",)), gpus, vision=p)
    assert none.vision and none.vision["device"] == "CPU" and none.host.vision_bytes == p.total_bytes()
    assert projector_device(gpus, flags.with_(device=("CUDA1", "CUDA0")), mmproj_offload=False) == "CPU"


def test_recommend_vision_reads_the_projector_beside_the_model_and_counts_it(vision_dir: Path) -> None:
    model = str(vision_dir / "tiny-F16.gguf")
    plan = plan_for(model, hardware_for("rtx-4090"), Wishes(vision=True)).plan
    projector = plan.candidate.projector
    assert isinstance(projector, Projector) and projector.from_header  # the header was read, not the file size
    assert plan.estimate.device("CUDA0").vision_bytes == projector.total_bytes()
    assert plan.command()[-2:] == ["--mmproj", str(vision_dir / "mmproj-F16.gguf")]
    plain = plan_for(model, hardware_for("rtx-4090"), Wishes()).plan
    assert plain.command()[-1] == "--no-mmproj" and plain.estimate.vision_bytes == 0


def test_recommend_vision_json_shows_the_projector_per_device(vision_dir: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", str(vision_dir / "tiny-F16.gguf"), "--gpu", "none", "--vision", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    cpu = next(d for d in doc["memory"]["devices"] if d["name"] == "CPU")
    assert doc["memory"]["vision"]["device"] == "CPU" and doc["memory"]["vision"]["sized_from"] == "header"
    assert cpu["vision_bytes"] == doc["memory"]["vision"]["weights_bytes"] + doc["memory"]["vision"]["compute_bytes"]
    assert doc["command"][-2:] == ["--mmproj", str(vision_dir / "mmproj-F16.gguf")]
    assert not any(f["kind"] == "vision" for f in doc["health"])
    assert main(["recommend", str(vision_dir / "tiny-F16.gguf"), "--gpu", "none", "--json"]) == 0
    plain = json.loads(capsys.readouterr().out)
    assert plain["command"][-1] == "--no-mmproj"
    assert [f["fix"] for f in plain["health"] if f["kind"] == "vision"] == ["--vision"]


def test_estimate_takes_the_projector_and_its_offload_as_llama_server_does(vision_dir: Path,
                                                                           capsys: pytest.CaptureFixture[str]) -> None:
    model, mmproj = str(vision_dir / "tiny-F16.gguf"), str(vision_dir / "mmproj-F16.gguf")
    assert main(["estimate", model, "-c", "1024", "--mmproj", mmproj, "--gpu", "rtx-4090", "--json"]) == 0
    gpu = json.loads(capsys.readouterr().out)
    assert main(["estimate", model, "-c", "1024", "-mm", mmproj, "--no-mmproj-offload", "--gpu", "rtx-4090",
                 "--json"]) == 0
    cpu = json.loads(capsys.readouterr().out)
    assert gpu["memory"]["vision"]["device"] == "CUDA0" and cpu["memory"]["vision"]["device"] == "CPU"
    assert gpu["memory"]["vision_bytes"] == cpu["memory"]["vision_bytes"] > 0
    assert main(["estimate", model, "--mmproj", model, "--json"]) != 0
    assert "not a vision projector" in capsys.readouterr().err


def test_recommend_and_serve_take_no_mmproj_offload_and_plan_the_projector_on_the_cpu(
        vision_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model, mmproj = str(vision_dir / "tiny-F16.gguf"), str(vision_dir / "mmproj-F16.gguf")
    assert main(["recommend", model, "--gpu", "rtx-4090", "--vision", "--json"]) == 0
    gpu = json.loads(capsys.readouterr().out)
    assert main(["recommend", model, "--gpu", "rtx-4090", "--vision", "--no-mmproj-offload", "--json"]) == 0
    cpu = json.loads(capsys.readouterr().out)
    assert gpu["memory"]["vision"]["device"] == "CUDA0" and cpu["memory"]["vision"]["device"] == "CPU"
    on_cpu = {d["name"]: d["vision_bytes"] for d in cpu["memory"]["devices"]}
    assert on_cpu["CPU"] == cpu["memory"]["vision_bytes"] > 0 and on_cpu["CUDA0"] == 0
    assert cpu["budget"]["reserved_on"] == "CPU" and gpu["budget"]["reserved_on"] == "CUDA0"
    assert cpu["command"][-3:] == ["--mmproj", mmproj, "--no-mmproj-offload"]
    assert "--no-mmproj-offload" not in gpu["command"] and cpu["plan"]["mmproj_offload"] is False
    # the projector's growth leaves the GPU's headroom and is held in RAM instead
    reserve = cpu["budget"]["reserved_bytes"]
    assert reserve > 0
    assert cpu["headroom_bytes"]["CUDA0"] - gpu["headroom_bytes"]["CUDA0"] == reserve + gpu["memory"]["vision_bytes"]
    assert gpu["headroom_bytes"]["CPU"] - cpu["headroom_bytes"]["CPU"] == reserve + cpu["memory"]["vision_bytes"]
    for command in ("recommend", "serve"):  # both take the flag; without --vision it is one line, not a usage error
        assert main([command, model, "--gpu", "rtx-4090", "--no-mmproj-offload"]) == 1
        assert "--no-mmproj-offload places the vision projector: it needs --vision" in capsys.readouterr().err

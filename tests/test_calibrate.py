"""tuner calibrate on this machine's CPU (issue 12): a scaled-down card of the Qwen3.5 family, calibrated with its
sparse twin on the real llama-server; llama.cpp's reported buffers land in the profile, a deliberately biased
compute term is corrected afterwards, nothing is left running or on disk, and an exported calibration file is read
back by ``recommend`` on a machine without calibration."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tuner.paths import cache_dir, catalog_dir

MINI = "qwen3.5-mini-a0b"
MINI_REF = f"{MINI}:Q4_K_M"
SMALL = ("--depths", "0,128", "--prompt-tokens", "32", "--gen-tokens", "4", "--ignore-load")


@pytest.fixture(scope="module")
def catalogs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped catalogs plus a scaled-down card of the family: Qwen3.5-35B-A3B's card with 8 layers (2 of them
    attention), 512 wide, 32 experts of 256, a 32,000-token vocabulary; same quant recipes."""
    folder = tmp_path_factory.mktemp("catalogs") / "catalogs"
    shutil.copytree(catalog_dir(), folder)
    card = yaml.safe_load((folder / "models" / "qwen3.5-35b-a3b.yaml").read_text())
    card.update(key=MINI, name="Qwen3.5-mini (scaled-down test card)", aliases=[], vocab_size=32000, mtp_layers=0,
                known_sizes=[], quants=["Q8_0", "Q4_K_M"], quality_order=["Q8_0", "Q4_K_M"])
    card["repos"] = [{"repo": card["default_repo"], "file": "mini-{quant}.gguf", "mtp": False}]
    card["gguf"].update({"block_count": 8, "context_length": 32768, "embedding_length": 512,
                         "attention.head_count": 8, "attention.key_length": 64, "attention.value_length": 64,
                         "rope.dimension_count": 16, "rope.dimension_sections": [3, 3, 2, 0], "expert_count": 32,
                         "expert_used_count": 4, "expert_feed_forward_length": 256,
                         "expert_shared_feed_forward_length": 256, "ssm.state_size": 64, "ssm.group_count": 4,
                         "ssm.time_step_rank": 8, "ssm.inner_size": 512})
    (folder / "models" / f"{MINI}.yaml").write_text(yaml.safe_dump(card, sort_keys=False))
    return folder


@pytest.fixture
def env(catalogs: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    monkeypatch.setenv("TUNER_CATALOG_DIR", str(catalogs))
    monkeypatch.setenv("TUNER_CONFIG_DIR", str(tmp_path / "config"))
    return {**os.environ}


def _twins_left() -> list[Path]:
    folder = cache_dir() / "calibrate"
    return sorted(folder.glob("twin-*")) if folder.is_dir() else []


def _tuner(args: list[str], env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL, check=False)


@pytest.mark.server
def test_a_cpu_calibration_lands_llama_cpps_buffers_and_corrects_a_biased_compute_term(
        llama_build: Any, env: dict[str, str], monkeypatch: pytest.MonkeyPatch,
        processes_naming: Any) -> None:
    import tuner.estimate as estimate_module
    from tuner.calibration import CalibrateOptions, run_calibration
    from tuner.cli.estimate import estimate_result
    from tuner.hardware import hardware_for
    from tuner.models import resolve_layout
    from tuner.profile_store import ProfileStore, load_calibration

    true_compute = estimate_module.compute_bytes_cpu
    monkeypatch.setattr(estimate_module, "compute_bytes_cpu", lambda *a, **k: int(true_compute(*a, **k) * 1.4))
    hardware = hardware_for("none")
    before = set(_twins_left())
    seen: list[Any] = []
    report = run_calibration(MINI_REF, hardware, CalibrateOptions(
        quick=True, server_bin=str(llama_build.server_bin), depths=(0, 128), prompt_tokens=32, gen_tokens=4,
        ignore_load=True),
        on_progress=seen.append)
    assert [r.rung.name for r in report.rungs] == ["ctx4096-f16", "ctx32768-f16", "ctx32768-q8_0", "ctx4096-ubatch2048"]
    assert all(r.failed is None for r in report.rungs)
    assert seen[0].done == 0 and seen[0].eta_s and seen[-1].done == seen[-1].total == 5
    assert report.twin_disk_bytes < report.twin_file_bytes / 2, "a sparse file"
    assert set(_twins_left()) == before, "the twin is deleted"
    assert processes_naming("twin.gguf") == [], "no llama-server left running"

    # llama.cpp's reported buffers are in the store: KV and recurrent state as the estimate says, compute as reported
    points = ProfileStore().load_points()
    memory = [p for p in points if p.__class__.__name__ == "MemoryPoint"]
    speed = [p for p in points if p.__class__.__name__ == "SpeedPoint"]
    assert len(memory) == 4 and len(speed) == 8 and report.recorded == 12
    for p in memory:
        assert p.device == f"CPU: {hardware.cpu_model}" and p.source == "calibrate"
        for kind in ("kv", "recurrent"):
            assert abs(p.reported[kind] - p.predicted[kind]) <= 0.01 * p.reported[kind] + 11000, (kind, p)
        assert p.compute_ratio == pytest.approx(1 / 1.4, rel=0.15), "the bias shows in every rung"
    assert all(s.tg_tok_s > 0 and s.pp_tok_s > 0 and s.weights == "zeros+routing" for s in speed)

    # the next estimate for that shape uses them: the biased term lands on what llama.cpp reported
    layout = resolve_layout(MINI_REF)
    cal = load_calibration(hardware, llama_build)
    rung = report.rungs[1]
    flags = rung.rung.flags
    reported = rung.reported["compute"]["CPU"]
    biased = estimate_result(layout, flags, hardware)["memory"]["compute_bytes"]
    fixed = estimate_result(layout, flags, hardware, calibration=cal)
    assert biased > 1.2 * reported
    assert abs(fixed["memory"]["compute_bytes"] - reported) <= 0.01 * reported
    assert fixed["calibration"]["line"] == "calibrated on this machine by 4 runs"
    assert fixed["calibration"]["devices"]["CPU"]["scope"] == "this shape and ubatch"
    scale = fixed["calibration"]["speed"]
    assert scale["scope"] == "cpu" and scale["runs"] == 8
    plain = estimate_result(layout, flags, hardware)["predicted"]
    assert fixed["predicted"]["tg_tok_s"] == pytest.approx(plain["tg_tok_s"] * scale["tg_scale"], rel=1e-3)
    unbiased = true_compute
    monkeypatch.setattr(estimate_module, "compute_bytes_cpu", unbiased)
    at_8k = flags.with_(ctx_size=8192)
    true_8k = estimate_result(layout, at_8k, hardware)["memory"]["compute_bytes"]
    monkeypatch.setattr(estimate_module, "compute_bytes_cpu", lambda *a, **k: int(true_compute(*a, **k) * 1.4))
    corrected_8k = estimate_result(layout, at_8k, hardware, calibration=cal)["memory"]["compute_bytes"]
    assert corrected_8k == pytest.approx(true_8k, rel=0.1), "a context the ladder did not launch is corrected too"


@pytest.mark.server
def test_an_exported_calibration_is_read_back_by_recommend_on_a_machine_without_one(
        llama_build: Any, env: dict[str, str], catalogs: Path, tmp_path: Path) -> None:
    exported = tmp_path / "mini-cpu.json"
    run = _tuner(["calibrate", MINI_REF, "--gpu", "none", "--quick", *SMALL, "--export", str(exported), "--json"],
                 env)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout)
    assert result["recorded_points"] == 12 and len(result["run"]["rungs"]) == 4
    assert "[4/5] ctx4096-ubatch2048" in run.stderr and "s left" in run.stderr, "progress with an estimated time"
    text = exported.read_text()
    doc = json.loads(text)
    assert doc["format"] == "tuner-calibration" and doc["version"] == 1 and len(doc["points"]) == 12
    assert socket.gethostname() not in text and str(tmp_path) not in text and str(Path.home()) not in text
    assert len(text) < 64 * 1024, "small"

    # this machine now says so
    est = _tuner(["estimate", MINI_REF, "--gpu", "none", "-c", "4096", "-np", "1", "--json"], env)
    assert json.loads(est.stdout)["calibration"]["line"] == "calibrated on this machine by 4 runs"
    again = _tuner(["calibrate", "--export", str(tmp_path / "again.json")], env)
    assert again.returncode == 0, again.stderr
    assert len(json.loads((tmp_path / "again.json").read_text())["points"]) == 12

    # another machine: no calibration of its own, the file shipped in the catalogs' calibrations/ folder
    shipped = tmp_path / "shipped"
    shutil.copytree(catalogs, shipped)
    (shipped / "calibrations").mkdir(exist_ok=True)
    shutil.copy(exported, shipped / "calibrations" / "mini-cpu.json")
    other = {**env, "TUNER_CONFIG_DIR": str(tmp_path / "other-config"), "TUNER_CATALOG_DIR": str(shipped)}
    plain = _tuner(["recommend", MINI_REF, "--gpu", "none", "--json"],
                   {**other, "TUNER_CATALOG_DIR": str(catalogs)})
    assert json.loads(plain.stdout)["calibration"] is None
    rec = _tuner(["recommend", MINI_REF, "--gpu", "none", "--json"], other)
    assert rec.returncode == 0, rec.stderr
    cal = json.loads(rec.stdout)["calibration"]
    assert cal["line"] == "calibrated from shipped mini-cpu.json by 4 runs"
    assert cal["devices"]["CPU"]["origin"] == "shipped mini-cpu.json" and cal["devices"]["CPU"]["compute_runs"] >= 1
    text_out = _tuner(["recommend", MINI_REF, "--gpu", "none"], other).stdout
    assert "calibrated from shipped mini-cpu.json by 4 runs" in text_out


def test_calibrate_names_no_catalog_gpu_and_export_needs_a_calibration(env: dict[str, str], tmp_path: Path) -> None:
    bad = _tuner(["calibrate", MINI_REF, "--gpu", "rtx-4090"], env, timeout=120)
    assert bad.returncode != 0 and bad.stderr.count("\n") == 1 and "measures this machine" in bad.stderr
    empty = _tuner(["calibrate", "--export", str(tmp_path / "x.json")], env, timeout=120)
    assert empty.returncode != 0 and "nothing calibrated on this machine yet" in empty.stderr
    assert not (tmp_path / "x.json").exists()


@pytest.mark.server
def test_speeds_measured_on_a_busy_cpu_are_shown_but_not_recorded(llama_build: Any, env: dict[str, str],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from tuner.calibration import CalibrateOptions, run_calibration
    from tuner.hardware import hardware_for
    from tuner.profile_store import ProfileStore

    hardware = hardware_for("none")
    monkeypatch.setattr(os, "getloadavg", lambda: (4.0 * hardware.cpu_logical_cores, 0.0, 0.0))
    report = run_calibration(MINI_REF, hardware, CalibrateOptions(
        quick=True, server_bin=str(llama_build.server_bin), depths=(0,), prompt_tokens=16, gen_tokens=4))
    assert all(r.speed for r in report.rungs), "measured and shown"
    stored = ProfileStore().load_points()
    assert stored and all(p.__class__.__name__ == "MemoryPoint" for p in stored), "buffer sizes only"
    assert report.recorded == len(stored) == 4
    assert "the CPU was busy (load average" in report.notes[0]


def test_device_names_from_llama_servers_log_print_as_text_not_markup() -> None:
    import io

    from rich.console import Console

    from tuner.cli.calibrate import render_calibration

    hostile = "[/bold]CUDA0 [red]x[/red] \x1b[31mESC"
    run = {"model": "m", "quant": "Q4_K_M", "shape": "qwen35moe-4L-256e-[b]", "hardware": "CPU",
           "build": {"commit": "[/i]abc\x1b[0m", "cuda": False}, "seconds": 1.0,
           "twin": {"file_bytes": 1, "disk_bytes": 1}, "skipped": [], "notes": [],
           "rungs": [{"name": "ctx-4096", "failed": None, "reported": {"compute": {hostile: 2 << 20}},
                      "predicted": {"compute": {hostile: 1 << 20}}, "uncounted_bytes": {}, "speed": []}]}
    result = {"run": run, "calibration": {"devices": {hostile: {"compute_scale": 2.0, "scope": "this shape",
                                                                "compute_runs": 1}}}}
    out = io.StringIO()
    render_calibration(Console(file=out, width=300, color_system=None), result)
    printed = out.getvalue()
    assert "\x1b" not in printed
    assert printed.count("[/bold]CUDA0 [red]x[/red] \\x1b[31mESC") == 2  # the table row and the scale line
    assert "qwen35moe-4L-256e-[b]" in printed and "[/i]abc\\x1b[0m" in printed

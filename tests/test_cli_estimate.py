"""``tuner estimate`` through a subprocess, as a user runs it: the table, the JSON document, ``--check`` against
llama.cpp's own dry run, and every kind of bad input as one line on stderr."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tuner.estimate import ServerFlags, estimate_memory
from tuner.gguf_file import read_gguf
from tuner.models import resolve_layout
from tuner.synth import SynthSpec, qwen35_35b_a3b_spec, real_vocab_overrides, write_synthetic_gguf
from tuner.units import GiB, MiB

DEVICE_KEYS = {"name", "weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "output_bytes", "total_bytes"}


def tuner(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "tuner", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def estimate_json(*args: str) -> dict[str, Any]:
    proc = tuner("estimate", *args, "--json")
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("cli")
    good = write_synthetic_gguf(d / "good.gguf", SynthSpec(mtp=True))[0]
    data = good.read_bytes()
    header_bytes = read_gguf(good).header_bytes
    out = {"good": good}
    (d / "empty.gguf").touch()
    out["empty"] = d / "empty.gguf"
    out["random"] = d / "random.gguf"
    out["random"].write_bytes(os.urandom(8192))
    out["truncated_header"] = d / "cut-header.gguf"
    out["truncated_header"].write_bytes(data[: header_bytes // 3])
    out["truncated_data"] = d / "cut-data.gguf"
    out["truncated_data"].write_bytes(data[:-4096])
    out["wrong_magic"] = d / "magic.gguf"
    out["wrong_magic"].write_bytes(b"GGJT" + data[4:])
    bad_version = bytearray(data)
    bad_version[4:8] = struct.pack("<I", 99)
    out["bad_version"] = d / "version.gguf"
    out["bad_version"].write_bytes(bytes(bad_version))
    out["unknown_arch"] = write_synthetic_gguf(d / "llama.gguf", SynthSpec(arch="llama"))[0]
    unknown = bytearray(out["unknown_arch"].read_bytes())
    i = unknown.index(b"llama")  # general.architecture's value comes first: rename it in place
    unknown[i:i + 5] = b"zebra"
    out["unknown_arch"].write_bytes(bytes(unknown))
    shards = write_synthetic_gguf(d / "split.gguf", SynthSpec(), split_max_tensors=15)
    shards[1].unlink()
    out["missing_shard"] = shards[0]
    out["directory"] = d / "not-models"  # a folder is read as a folder of quants: one without any GGUF
    out["directory"].mkdir()
    (out["directory"] / "README.txt").write_text("no models here")
    out["missing"] = d / "nope.gguf"
    return out


# ------------------------------------------------------------------------------------------------ output


def test_table_output_names_the_model_and_its_devices(models: dict[str, Path]) -> None:
    proc = tuner("estimate", str(models["good"]), "-c", "8192", "-np", "2", "--gpu", "none")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "qwen35moe" in out and "3 recurrent" in out and "MTP layer" in out
    assert "context: n_ctx 8192, per slot 4096, 2 slot(s)" in out
    assert "Memory estimate" in out and "CPU" in out
    assert proc.stderr == ""


def test_json_document_has_context_memory_and_per_device_totals(models: dict[str, Path]) -> None:
    doc = estimate_json(str(models["good"]), "-c", "10000", "-np", "3", "--gpu", "none")
    assert doc["context"]["n_ctx"] == 10752 and doc["context"]["n_ctx_seq"] == 3584 and doc["context"]["n_seq"] == 3
    mem = doc["memory"]
    assert mem["devices"] and all(set(dev) >= DEVICE_KEYS for dev in mem["devices"])
    for key in ("weights_bytes", "kv_bytes", "recurrent_bytes", "compute_bytes", "output_bytes"):
        assert isinstance(mem[key], int)
        assert mem[key] == sum(dev[key] for dev in mem["devices"])
    for dev in mem["devices"]:
        assert dev["total_bytes"] == sum(dev[k] for k in DEVICE_KEYS - {"name", "total_bytes"})
    assert mem["kv_bytes"] == 10752 * 2 * (2 * 16) * 2  # 1 attention layer, 2 KV heads of 16, f16
    assert doc["layout"]["recurrent_layers"] == [0, 1, 2]


def test_json_for_a_catalog_gpu_puts_the_layers_on_it(tmp_path: Path) -> None:
    spec = qwen35_35b_a3b_spec(n_layer=8, n_expert=32)
    model = write_synthetic_gguf(tmp_path / "m.gguf", spec)[0]
    doc = estimate_json(str(model), "-c", "65536", "-np", "1", "--gpu", "h100-80gb", "-ctk", "q8_0", "-ctv", "q8_0")
    names = [d["name"] for d in doc["memory"]["devices"]]
    assert names == ["CUDA0", "CPU"]
    gpu = doc["memory"]["devices"][0]
    assert gpu["kv_bytes"] == 65536 * 2 * (512 * 34 // 32 * 2)  # 2 attention layers, q8_0 K and V
    assert gpu["weights_bytes"] > doc["memory"]["devices"][1]["weights_bytes"]
    assert doc["hardware"]["gpus"][0]["vram_total_bytes"] > 70 * GiB


def test_a_described_host_sets_ram_bandwidth_and_cores_for_the_prediction(models: dict[str, Path]) -> None:
    args = (str(models["good"]), "-c", "4096", "--gpu", "none", "--ram", "32G", "--cpu-cores", "4")
    slow, fast = estimate_json(*args, "--ram-bandwidth", "40"), estimate_json(*args, "--ram-bandwidth", "80")
    assert (slow["hardware"]["ram_total_bytes"], slow["hardware"]["ram_available_bytes"]) == (32 * GiB, 28 * GiB)
    assert slow["hardware"]["cpu_physical_cores"] == 4 and slow["hardware"]["host_source"] == "given"
    assert fast["hardware"]["ram_bandwidth_bytes_s"] == 2 * slow["hardware"]["ram_bandwidth_bytes_s"] == 80 * 10**9
    assert fast["predicted"]["tg_tok_s"] > slow["predicted"]["tg_tok_s"]
    assert slow["memory"] == fast["memory"]  # the host changes speeds, not sizes


def test_a_split_model_is_estimated_from_its_first_shard_like_the_whole_file(tmp_path: Path) -> None:
    spec = SynthSpec(mtp=True)
    whole = write_synthetic_gguf(tmp_path / "whole.gguf", spec)[0]
    shards = write_synthetic_gguf(tmp_path / "split.gguf", spec, split_max_tensors=10)
    assert len(shards) >= 4
    args = ("-c", "8192", "-np", "2", "--gpu", "none")
    split_doc, whole_doc = estimate_json(str(shards[0]), *args), estimate_json(str(whole), *args)
    assert split_doc["model"] == str(shards[0])
    assert split_doc["memory"] == whole_doc["memory"]
    assert split_doc["layout"]["file_bytes"] == sum(p.stat().st_size for p in shards)


def test_host_memory_and_the_mtp_draft_through_the_cli(models: dict[str, Path]) -> None:
    doc = estimate_json(str(models["good"]), "-c", "4096", "-np", "2", "--ctx-checkpoints", "4", "--cache-ram", "100",
                        "--spec-type", "draft-mtp", "--gpu", "none")
    state = doc["layout"]["recurrent_bytes_per_seq"]
    assert state == 3 * 4 * (3 * (64 + 2 * 2 * 16) + 16 * 64)  # 3 DeltaNet layers of the tiny model, f32
    host = doc["memory"]["host"]
    assert host["checkpoints_bytes"] == 2 * 4 * state
    assert host["prompt_cache_bytes"] == 100 * MiB
    cpu = doc["memory"]["devices"][-1]
    assert host["total_bytes"] == cpu["total_bytes"] + 2 * 4 * state + 100 * MiB
    cell = 2 * (2 * 16) * 2  # K + V of 2 heads of 16, f16
    assert doc["memory"]["kv_bytes"] == 4096 * cell * 2  # the attention layer + the MTP layer of the draft context
    assert doc["memory"]["recurrent_bytes"] == 2 * (1 + 3) * state  # 2 slots, 3 rollback snapshots each
    table = tuner("estimate", str(models["good"]), "-c", "4096", "-np", "2", "--gpu", "none")
    assert "ctx checkpoints" in table.stdout and "prompt cache" in table.stdout and "host RAM at worst" in table.stdout


def test_hardware_command_names_a_catalog_gpu_as_llama_cpp_does() -> None:
    proc = tuner("hardware", "--gpu", "rtx-4090", "--json")
    assert proc.returncode == 0, proc.stderr
    (gpu,) = json.loads(proc.stdout)["gpus"]
    assert gpu["name"] == "CUDA0" and gpu["source"] == "catalog"
    assert gpu["vram_total_bytes"] == gpu["vram_free_bytes"] + gpu["vram_used_bytes"] > 23 * GiB
    assert gpu["mem_bandwidth_bytes_s"] > 900e9 and gpu["pcie_gen"] == 4
    cpu_only = tuner("hardware", "--gpu", "none")
    assert cpu_only.returncode == 0, cpu_only.stderr
    assert "GPUs: none (planning for CPU and RAM only)" in cpu_only.stdout


# ------------------------------------------------------------------------------------------------ bad input


@pytest.mark.parametrize(("case", "args", "expected"), [
    ("missing", [], "no such file"),
    ("empty", [], "is empty"),
    ("random", [], "is not a GGUF file"),
    ("truncated_header", [], "is truncated"),
    ("truncated_data", [], "bytes missing"),
    ("wrong_magic", [], "b'GGJT'"),
    ("bad_version", [], "unsupported GGUF version 99"),
    ("unknown_arch", [], "unsupported architecture 'zebra'"),
    ("missing_shard", [], "split model is missing 1 of"),
    ("directory", [], "holds no GGUF model files"),
    ("good", ["--ctx-size", "-1"], "--ctx-size must be 0"),
    ("good", ["--ubatch-size", "0"], "--ubatch-size must be positive"),
    ("good", ["--parallel", "0"], "--parallel must be positive"),
    ("good", ["--cache-type-k", "q3_k"], "unknown cache type"),
    ("good", ["-ctv", "q8_0", "-fa", "off"], "quantized V cache requires flash attention"),
    ("good", ["--n-gpu-layers", "lots"], "--n-gpu-layers must be a number"),
    ("good", ["--n-gpu-layers", "-5"], "--n-gpu-layers must not be negative"),
    ("good", ["--batch-size", "0"], "--batch-size must be positive"),
    ("good", ["--ubatch-size", "-512"], "--ubatch-size must be positive"),
    ("good", ["--parallel", "-3"], "--parallel must be positive"),
    ("good", ["--n-cpu-moe", "-1"], "--n-cpu-moe must be 0 or positive"),
    ("good", ["--ctx-checkpoints", "-1"], "--ctx-checkpoints and --spec-draft-n-max must be 0 or positive"),
    ("good", ["--cache-ram", "-2"], "--cache-ram must be -1 (no limit), 0 (off) or a size in MiB"),
    ("good", ["--cache-type-v", "q4_K"], "unknown cache type 'q4_k'"),
    ("good", ["--flash-attn", "maybe"], "--flash-attn must be one of on, off, auto"),
    ("good", ["--spec-type", "eagle3"], "is not sized by tuner"),
    ("good", ["-ctk", "q8_0"], "does not divide the head size 16"),  # llama.cpp refuses it with FA on (16-wide heads)
])
def test_bad_input_is_one_line_on_stderr(models: dict[str, Path], case: str, args: list[str],
                                         expected: str) -> None:
    proc = tuner("estimate", str(models[case]), "--gpu", "none", *args)
    assert proc.returncode != 0
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("tuner: error: ") and expected in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert proc.stdout == ""


# ------------------------------------------------------------------------------------------------ a real-size header


def q4_k_m_like(name: str, role: str) -> str:
    return {"norm": "f32", "router": "f32", "experts": "q4_K", "embd": "q4_K", "output": "q6_K"}.get(role, "q8_0")


def test_estimate_reads_a_20_gb_class_file_with_the_real_tokenizer(tmp_path: Path) -> None:
    """Qwen3.5-35B-A3B shapes at a Q4_K_M-like mix, 248,320 tokens and 247,587 merges (a 13 MB header) in a sparse
    20.9 GB file. Speed is measured, not asserted: the command's wall time (interpreter start-up included) and the
    time to read the header, build the layout and estimate are printed for the record."""
    spec = qwen35_35b_a3b_spec(**real_vocab_overrides())
    model = write_synthetic_gguf(tmp_path / "a3b.gguf", spec, type_for=q4_k_m_like)[0]
    assert 20 * 10**9 < model.stat().st_size < 22 * 10**9
    started = time.monotonic()
    doc = estimate_json(str(model), "-c", "262144", "-np", "1", "--gpu", "none")
    elapsed = time.monotonic() - started
    # the work itself, without the interpreter's and typer's start-up: best of three
    timings = []
    for _ in range(3):
        t0 = time.perf_counter()
        estimate_memory(resolve_layout(str(model)), ServerFlags(ctx_size=262144, parallel=1))
        timings.append(time.perf_counter() - t0)
    print(f"tuner estimate on a {model.stat().st_size / 1e9:.0f} GB sparse file with a "
          f"{read_gguf(model).header_bytes / 1e6:.1f} MB header: {elapsed:.2f} s as a command, "
          f"{min(timings):.3f} s to read, lay out and estimate")
    assert doc["layout"]["n_vocab"] == 248_320
    assert doc["memory"]["kv_bytes"] == 5120 * MiB
    assert doc["memory"]["recurrent_bytes"] == 65_863_680


# ------------------------------------------------------------------------------------------------ --check


@pytest.mark.server
def test_check_runs_llama_fit_params_beside_the_estimate(models: dict[str, Path], server_bin: Path) -> None:
    doc = estimate_json(str(models["good"]), "-c", "4096", "-np", "1", "--gpu", "none", "--check",
                        "--server-bin", str(server_bin))
    check = doc["check"]
    assert check["tool"] == "llama-fit-params"
    (host,) = check["devices"]
    assert host["name"] == "CPU"
    ours = doc["memory"]["devices"][-1]
    # whole MiB, rounded down
    assert host["model_bytes"] == ours["weights_bytes"] // MiB * MiB
    assert host["context_bytes"] == (ours["kv_bytes"] + ours["recurrent_bytes"]) // MiB * MiB
    # its compute holds a whole ubatch of logits (n_outputs = n_batch), which llama-server does not allocate
    assert host["compute_bytes"] >= ours["compute_bytes"] // MiB * MiB
    assert any("whole ubatch" in note for note in check["notes"])
    table = tuner("estimate", str(models["good"]), "-c", "4096", "--gpu", "none", "--check")  # the cached build
    assert table.returncode == 0, table.stderr
    assert "llama-fit-params" in table.stdout and "no --kv-unified" in table.stdout


def test_check_without_the_tool_is_a_clear_error(models: dict[str, Path], tmp_path: Path) -> None:
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\nexit 0\n")
    fake.chmod(0o755)
    proc = tuner("estimate", str(models["good"]), "--gpu", "none", "--check", "--server-bin", str(fake))
    assert proc.returncode != 0
    assert proc.stderr.count("\n") == 1 and "no llama-fit-params beside" in proc.stderr

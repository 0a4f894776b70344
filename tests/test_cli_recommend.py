"""``tuner recommend`` end to end: the JSON document, the report, errors, through the real entry points."""

from __future__ import annotations

import json
import subprocess
import sys

import psutil
import pytest

from tuner.cli import main
from tuner.cli.recommend import wishes_from_options
from tuner.units import GiB, MiB


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "tuner", "recommend", *args], capture_output=True, text=True,
                          timeout=120, check=False)


def test_json_document_through_a_subprocess() -> None:
    proc = run_cli("--gpu", "rtx-4090", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    plan = doc["plan"]
    for key in ("model", "quant", "file", "cache_type_k", "cache_type_v", "n_cpu_moe", "n_gpu_layers", "ctx_size",
                "parallel", "batch_size", "ubatch_size", "flash_attn", "kv_unified"):
        assert key in plan, key
    assert plan["model"] == "qwen3.5-35b-a3b" and plan["parallel"] == 1
    assert set(doc["budget"]) >= {"device", "vram_total_bytes", "vram_free_bytes", "buffer_bytes"}
    assert doc["budget"]["device"] == "CUDA0" and doc["budget"]["buffer_bytes"] == 1280 * MiB
    assert set(doc["predicted"]) >= {"tg_tok_s", "pp_tok_s", "tg_bound_tok_s"}
    assert 0 < doc["predicted"]["tg_tok_s"] < doc["predicted"]["tg_bound_tok_s"]
    cuda0 = next(d for d in doc["memory"]["devices"] if d["name"] == "CUDA0")
    assert cuda0["total_bytes"] + doc["budget"]["buffer_bytes"] <= doc["budget"]["vram_free_bytes"]
    command = doc["command"]
    assert command[:3] == ["llama-server", "-m", plan["file"]] and command[-3:] == ["--fit", "off", "--jinja"]
    assert command[command.index("--ctx-size") + 1] == str(plan["ctx_size"])
    assert 2 <= len(doc["alternatives"]) <= 4
    assert all(a["why_not"] and "predicted" in a for a in doc["alternatives"])


def test_report_shows_plan_memory_speed_alternatives_and_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--gpu", "rtx-5080", "--quant", "Q4_K_M"]) == 0
    out = capsys.readouterr().out
    for text in ("Plan:", "Q4_K_M", "--n-cpu-moe", "Memory (estimate)", "buffer 1.25 GiB kept", "Speed, predicted",
                 "Alternatives", "Command:", "llama-server -m Qwen3.5-35B-A3B-Q4_K_M.gguf"):
        assert text in out, text


@pytest.mark.skipif(psutil.virtual_memory().available < 16 * GiB, reason="plans for this machine's RAM")
def test_cpu_only_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--gpu", "none", "--ctx-size", "8192", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["budget"]["device"] == "CPU" and doc["budget"]["gpus"] == []
    assert doc["plan"]["ctx_size"] == 8192
    assert all(d["name"] == "CPU" for d in doc["memory"]["devices"])


def test_nothing_fits_is_one_line_on_stderr_and_a_failing_exit() -> None:
    proc = run_cli("--gpu", "none", "--buffer", "4096G")
    assert proc.returncode != 0
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tuner: error: nothing fits")


def test_bad_preference_is_a_user_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--gpu", "rtx-3090", "--prefer", "fast"]) != 0
    assert "--prefer must be one of speed, quality, context" in capsys.readouterr().err


def test_planner_options_become_wishes() -> None:
    w = wishes_from_options(ctx_size=0, parallel=2, prefer="Quality", vision=True, buffer="1.5G", quant="Q4_K_M",
                            cache_type="Q8_0", allow_yarn=False)
    assert (w.ctx_size, w.parallel, w.prefer, w.vision, w.buffer_bytes, w.quant, w.cache_type) == \
        (None, 2, "quality", True, int(1.5 * GiB), "Q4_K_M", "q8_0")

"""The estimate against llama.cpp itself: a real llama-server (CPU build) loads synthetic models and prints its
buffers (``-lv 4``); :mod:`tuner.serverlog` parses them and every figure is compared with ``estimate_memory``.

Models: sparse (all-zero) ``qwen35moe``, ``qwen35`` and ``qwen3next`` files with the real Qwen3.5-35B-A3B widths
(n_embd 2048, head 256, the real DeltaNet dims) but 4 layers, 16 experts and a 16k vocabulary, each with the MTP
block, so a load takes well under a second; a tiny random ``qwen35moe``; and a q4_0 model for the CPU backend's
weight repacking.

Exact: n_ctx / n_ctx_seq / slots, KV, recurrent state and weights (to the log's 0.005 MiB print rounding).
Fitted: the compute buffer, within 20 % (see ``tuner.estimate.activation_peaks``).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from tuner.errors import TunerError
from tuner.estimate import ServerFlags, estimate_memory
from tuner.layout import TensorClass
from tuner.models import local_layout
from tuner.server import LlamaServer
from tuner.serverlog import MIB_PRINT_ROUNDING_BYTES, ReportedMemory, parse_load_log
from tuner.synth import qwen35_35b_a3b_spec, write_synthetic_gguf
from tuner.units import MiB

pytestmark = pytest.mark.server

COMPUTE_TOLERANCE = 0.20
# the load is over when the server says so, or when it gives up
_DONE_RE = re.compile(r"model loaded|exiting due to model loading error|failed to load model|error loading model")
LOAD_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Load:
    reported: ReportedMemory
    log: str
    returncode: int | None
    seconds: float


def load_once(server_bin: Path, model: Path, args: list[str]) -> Load:
    """Start llama-server on ``model``, wait until it has loaded (or failed), stop it, parse its log."""
    started = time.monotonic()
    server = LlamaServer(server_bin, model, ["--no-warmup", "-lv", "4", "--fit", "off", *args])
    with server:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while not _DONE_RE.search(server.log_text()) and server.running():
            if time.monotonic() > deadline:
                pytest.fail(f"llama-server did not finish loading within {LOAD_TIMEOUT_S} s: {server.log_tail()}")
            time.sleep(0.05)
        if not server.running():
            server.proc.wait(timeout=30)  # type: ignore[union-attr]
    text = server.log_text()
    server.cleanup_log()
    return Load(parse_load_log(text), text, server.poll(), time.monotonic() - started)


# ------------------------------------------------------------------------------------------------ models

REALISTIC = {"n_layer": 4, "n_expert": 16, "mtp": True, "extra_vocab": 16_000}


@pytest.fixture(scope="module")
def moe_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen35moe with the 35B-A3B widths (8 of 16 experts used, 512-wide experts), 3 DeltaNet + 1 attention + MTP."""
    return write_synthetic_gguf(tmp_path_factory.mktemp("vs") / "moe.gguf", qwen35_35b_a3b_spec(**REALISTIC))[0]


@pytest.fixture(scope="module")
def dense_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen35 (dense FFN 6144 wide) with the same attention and DeltaNet widths, and the MTP block."""
    spec = qwen35_35b_a3b_spec(arch="qwen35", n_ff=6144, **REALISTIC)
    return write_synthetic_gguf(tmp_path_factory.mktemp("vs") / "dense.gguf", spec)[0]


@pytest.fixture(scope="module")
def next_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """qwen3next (fused beta/alpha projection, plain RoPE, no recurrent rollback) at the same widths."""
    spec = qwen35_35b_a3b_spec(arch="qwen3next", n_expert_used=10, **REALISTIC)
    return write_synthetic_gguf(tmp_path_factory.mktemp("vs") / "next.gguf", spec)[0]


@pytest.fixture(scope="module")
def q4_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """q4_0 matrices and experts: the types the CPU backend repacks for its matmul kernels."""
    spec = qwen35_35b_a3b_spec(n_layer=4, n_expert=16, types={"matrix": "q4_0", "experts": "q4_0", "embd": "q8_0",
                                                               "output": "q8_0"})
    return write_synthetic_gguf(tmp_path_factory.mktemp("vs") / "q4.gguf", spec)[0]


MODELS = {"moe": "moe_model", "dense": "dense_model", "next": "next_model", "tiny": "tiny_moe_gguf"}

# (id, model, llama-server flags)
CONFIGS: list[tuple[str, str, list[str]]] = [
    ("moe-c10000", "moe", ["-c", "10000", "-np", "1"]),
    ("moe-c5000-np3", "moe", ["-c", "5000", "-np", "3"]),
    ("moe-c5000-np3-kvu", "moe", ["-c", "5000", "-np", "3", "-kvu"]),
    ("moe-auto-slots", "moe", ["-c", "8192"]),
    ("moe-np2-q8_0", "moe", ["-c", "8192", "-np", "2", "-ctk", "q8_0", "-ctv", "q8_0"]),
    ("moe-q4_0-q4_1", "moe", ["-c", "8192", "-np", "1", "-ctk", "q4_0", "-ctv", "q4_1"]),
    ("moe-iq4_nl-q5_0", "moe", ["-c", "8192", "-np", "1", "-ctk", "iq4_nl", "-ctv", "q5_0"]),
    ("moe-q5_1-f32", "moe", ["-c", "8192", "-np", "1", "-ctk", "q5_1", "-ctv", "f32"]),
    ("moe-bf16", "moe", ["-c", "8192", "-np", "1", "-ctk", "bf16", "-ctv", "bf16"]),
    ("moe-f32-f16", "moe", ["-c", "8192", "-np", "1", "-ctk", "f32", "-ctv", "f16"]),
    ("moe-ub256", "moe", ["-c", "8192", "-np", "1", "-ub", "256"]),
    ("moe-ub2048", "moe", ["-c", "8192", "-np", "1", "-ub", "2048"]),
    ("moe-np4-ub1024", "moe", ["-c", "8192", "-np", "4", "-ub", "1024"]),
    ("moe-np8-kvu", "moe", ["-c", "8192", "-np", "8", "-kvu"]),
    ("moe-fa-off", "moe", ["-c", "8192", "-np", "1", "-fa", "off"]),
    ("moe-fa-off-np2-kvu", "moe", ["-c", "4096", "-np", "2", "-kvu", "-fa", "off"]),
    ("moe-fa-off-q8_0-k", "moe", ["-c", "8192", "-np", "1", "-fa", "off", "-ctk", "q8_0"]),
    ("moe-mtp", "moe", ["-c", "8192", "-np", "1", "--spec-type", "draft-mtp"]),
    ("moe-mtp-np4-kvu", "moe", ["-c", "8192", "-np", "4", "-kvu", "--spec-type", "draft-mtp"]),
    ("moe-mtp-np3-q8_0", "moe", ["-c", "5000", "-np", "3", "--spec-type", "draft-mtp", "-ctk", "q8_0", "-ctv",
                                 "q8_0"]),
    ("dense-c10000", "dense", ["-c", "10000", "-np", "1"]),
    ("dense-c5000-np3", "dense", ["-c", "5000", "-np", "3"]),
    ("dense-np2-kvu-q8_0", "dense", ["-c", "8192", "-np", "2", "-kvu", "-ctk", "q8_0", "-ctv", "q8_0"]),
    ("dense-ub2048", "dense", ["-c", "8192", "-np", "1", "-ub", "2048"]),
    ("dense-fa-off", "dense", ["-c", "8192", "-np", "1", "-fa", "off"]),
    ("dense-mtp-np2", "dense", ["-c", "8192", "-np", "2", "--spec-type", "draft-mtp"]),
    ("next-c5000-np3", "next", ["-c", "5000", "-np", "3"]),
    ("next-mtp-np2-kvu", "next", ["-c", "8192", "-np", "2", "-kvu", "--spec-type", "draft-mtp"]),
    ("tiny-c4096", "tiny", ["-c", "4096", "-np", "1"]),
    ("tiny-np2-q8_0-k-fa-off", "tiny", ["-c", "4096", "-np", "2", "-ctk", "q8_0", "-fa", "off"]),
    ("tiny-fa-off-auto-slots", "tiny", ["-c", "3000", "-fa", "off"]),
]

_FLAG_NAMES = {"-c": "ctx_size", "-np": "parallel", "-ub": "ubatch_size", "-b": "batch_size", "-ctk": "cache_type_k",
               "-ctv": "cache_type_v", "-fa": "flash_attn", "--spec-type": "spec_type"}


def server_flags(args: list[str]) -> ServerFlags:
    """The llama-server flags of a config as tuner's ServerFlags."""
    values: dict[str, object] = {}
    i = 0
    while i < len(args):
        if args[i] == "-kvu":
            values["kv_unified"] = True
            i += 1
            continue
        name, value = _FLAG_NAMES[args[i]], args[i + 1]
        values[name] = int(value) if name in ("ctx_size", "parallel", "ubatch_size", "batch_size") else value
        i += 2
    return ServerFlags(**values)  # type: ignore[arg-type]


def assert_close(kind: str, reported: int, expected: int, tolerance: int, config: str) -> None:
    assert abs(reported - expected) <= tolerance, (
        f"{config}: {kind} reported {reported / MiB:.3f} MiB, estimated {expected / MiB:.3f} MiB")


@pytest.mark.parametrize(("config", "model_name", "args"), CONFIGS, ids=[c[0] for c in CONFIGS])
def test_estimate_matches_llama_server(request: pytest.FixtureRequest, server_bin: Path, config: str,
                                       model_name: str, args: list[str]) -> None:
    model = Path(request.getfixturevalue(MODELS[model_name]))
    layout = local_layout(model)
    flags = server_flags(args)
    est = estimate_memory(layout, flags)
    load = load_once(server_bin, model, args)
    rep = load.reported
    assert load.returncode in (0, -15, 143, None) and rep.loaded, f"{config}: did not load: {rep.errors}"

    assert (rep.n_ctx, rep.n_ctx_seq, rep.n_seq) == (est.n_ctx, est.n_ctx_seq, est.n_seq)
    target = rep.contexts[0]
    assert target.kv_unified == est.kv_unified
    assert target.n_ubatch == est.n_ubatch

    # weights are the tensor bytes (the MTP block's only when drafting with it)
    mtp_weights = sum(t.nbytes for t in layout.tensors if t.cls is TensorClass.MTP) if flags.spec_type else 0
    assert est.weights_bytes == layout.weights_bytes + mtp_weights
    for kind, expected in (("weights", est.weights_bytes), ("kv", est.kv_bytes),
                           ("recurrent", est.recurrent_bytes)):
        assert_close(kind, rep.total(kind), expected, max(rep.tolerance_bytes(kind), MIB_PRINT_ROUNDING_BYTES),
                     config)
    # the "size = …" summaries of each context say the same
    summary_tolerance = len(rep.contexts) * MIB_PRINT_ROUNDING_BYTES
    assert_close("kv summary", sum(c.kv_size_bytes or 0 for c in rep.contexts), est.kv_bytes, summary_tolerance,
                 config)
    assert_close("recurrent summary", sum(c.recurrent_size_bytes or 0 for c in rep.contexts), est.recurrent_bytes,
                 summary_tolerance, config)
    assert_close("output", rep.total("output"), est.output_bytes, max(rep.tolerance_bytes("output"),
                                                                        MIB_PRINT_ROUNDING_BYTES), config)

    compute = rep.total("compute")
    error = (est.compute_bytes - compute) / compute
    print(f"{config}: compute reported {compute / MiB:.2f} MiB, estimated {est.compute_bytes / MiB:.2f} MiB "
          f"({100 * error:+.1f} %), load {load.seconds:.2f} s")
    assert abs(error) <= COMPUTE_TOLERANCE, f"{config}: compute off by {100 * error:+.1f} %"
    if flags.spec_type:
        # the draft context: one attention layer of KV, its own compute buffer, no recurrent state
        assert len(rep.contexts) == 2
        draft = rep.contexts[1]
        assert (draft.n_ctx, draft.n_seq, draft.recurrent_size_bytes) == (est.n_ctx, est.n_seq, None)
        mtp_kv = est.n_ctx * layout.kv_bytes_per_cell("f16", "f16", [layout.n_layer])  # f16 whatever -ctk/-ctv say
        assert_close("draft kv", rep.context_total("kv", 1), mtp_kv, MIB_PRINT_ROUNDING_BYTES, config)
        assert draft.kv_layers == 1
        # recurrent rollback snapshots only where llama.cpp supports them (not qwen3next: clamped to 0)
        assert target.n_rs_seq == (flags.spec_draft_n_max if layout.arch != "qwen3next" else 0)


def test_quantized_v_without_flash_attention_fails_in_both(server_bin: Path, moe_model: Path) -> None:
    args = ["-c", "4096", "-np", "1", "-ctv", "q8_0", "-fa", "off"]
    with pytest.raises(TunerError, match="quantized V cache requires flash attention"):
        estimate_memory(local_layout(moe_model), server_flags(args))
    load = load_once(server_bin, moe_model, args)
    assert not load.reported.loaded
    assert "quantized V cache requires flash_attn to be enabled" in load.reported.errors
    assert load.returncode not in (0, None)


def test_cache_blocks_that_do_not_divide_the_head_size_fail_in_both(server_bin: Path, tiny_moe_gguf: Path) -> None:
    """q8_0 blocks hold 32 values; the tiny model's heads are 16 wide: llama.cpp refuses it with flash attention."""
    args = ["-c", "4096", "-np", "1", "-ctk", "q8_0"]
    with pytest.raises(TunerError, match="does not divide the head size 16"):
        estimate_memory(local_layout(tiny_moe_gguf), server_flags(args))
    load = load_once(server_bin, tiny_moe_gguf, args)
    assert not load.reported.loaded
    assert "K cache type q8_0 with block size 32 does not divide n_embd_head_k=16" in load.log
    assert load.returncode not in (0, None)


def test_cpu_repack_is_an_extra_copy_of_the_repacked_weights(server_bin: Path, q4_model: Path) -> None:
    """With repacking (the default) the CPU backend copies the tensors it re-lays out into an anonymous CPU_REPACK
    buffer, while the file stays mapped (CPU_Mapped, page cache that can be dropped once read). tuner counts the
    weights once, which is what ``--no-repack`` reports exactly."""
    layout = local_layout(q4_model)
    est = estimate_memory(layout, ServerFlags(ctx_size=4096, parallel=1))
    plain = load_once(server_bin, q4_model, ["-c", "4096", "-np", "1", "--no-repack"]).reported
    assert {b.buffer for b in plain.buffers if b.kind == "weights"} == {"CPU_Mapped"}
    assert_close("weights", plain.total("weights"), est.weights_bytes, plain.tolerance_bytes("weights"), "no-repack")

    repacked = load_once(server_bin, q4_model, ["-c", "4096", "-np", "1"]).reported
    by_buffer = {b.buffer: b.bytes for b in repacked.buffers if b.kind == "weights"}
    q4_bytes = sum(t.nbytes for t in layout.tensors if t.ggml_type.name == "q4_0")
    assert repacked.repacked_bytes == by_buffer.get("CPU_REPACK", 0)
    if "CPU_REPACK" in by_buffer:  # the CPU has kernels for repacked q4_0 (AVX2, NEON with i8mm/dotprod, …)
        assert 0 < by_buffer["CPU_REPACK"] <= q4_bytes + MIB_PRINT_ROUNDING_BYTES
        assert by_buffer["CPU_Mapped"] <= est.weights_bytes + MIB_PRINT_ROUNDING_BYTES
    else:
        assert_close("weights", repacked.total("weights"), est.weights_bytes, repacked.tolerance_bytes("weights"),
                     "repack")
    # repacking changes nothing else
    for kind in ("kv", "recurrent", "compute", "output"):
        assert repacked.total(kind) == plain.total(kind)


def test_log_jsonl_reports_the_same_buffers_and_a_breakdown_on_exit(server_bin: Path, moe_model: Path) -> None:
    args = ["-c", "4096", "-np", "2"]
    text_log = load_once(server_bin, moe_model, args).reported
    json_log = load_once(server_bin, moe_model, [*args, "--log-jsonl"]).reported
    for kind in ("weights", "kv", "recurrent", "compute", "output"):
        assert json_log.by_kind(kind) == text_log.by_kind(kind)
    assert json_log.breakdown is not None
    (host,) = [row for row in json_log.breakdown["rows"] if row["kind"] == "host"]
    assert host["model"] == json_log.total("weights") // MiB
    assert host["context"] == (json_log.total("kv") + json_log.total("recurrent")) // MiB
    assert host["compute"] == json_log.total("compute") // MiB


def test_estimated_kv_cache_type_sizes_follow_the_log_summary(server_bin: Path, moe_model: Path) -> None:
    """The ``llama_kv_cache: size = …, K (type): …, V (type): …`` line names the types the estimate priced."""
    load = load_once(server_bin, moe_model, ["-c", "4096", "-np", "1", "-ctk", "q5_0", "-ctv", "iq4_nl"])
    assert re.search(r"K \(q5_0\):\s+[\d.]+ MiB, V \(iq4_nl\)", load.log)
    layout = local_layout(moe_model)
    est = estimate_memory(layout, ServerFlags(ctx_size=4096, parallel=1, cache_type_k="q5_0", cache_type_v="iq4_nl"))
    assert est.kv_bytes == 4096 * (512 * 22 // 32 + 512 * 18 // 32)
    assert abs(load.reported.total("kv") - est.kv_bytes) <= MIB_PRINT_ROUNDING_BYTES

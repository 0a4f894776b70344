"""tuner.bench: flag sets, memory checks, prompts, statistics, results files, and real measurements and tuning
against llama-server on the CPU (the chart is tests/test_bench_plot.py; run_benchmark is tests/test_cli_bench.py)."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tuner import bench as b
from tuner.errors import TunerError
from tuner.estimate import estimate_memory
from tuner.flags import ServerFlags
from tuner.hardware import hardware_for
from tuner.models import local_layout
from tuner.planner import Budget, Wishes, fits, plan_for
from tuner.synth import SynthSpec, write_synthetic_gguf

# head_dim 32: llama.cpp refuses a q8_0 cache whose blocks (32) do not divide the head size (16 in the default spec)
Q8_SPEC = SynthSpec(head_dim=32, name="bench-qwen35moe")


@pytest.fixture(scope="module")
def moe_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "bench-qwen35moe.gguf"
    write_synthetic_gguf(path, Q8_SPEC)
    return path


@pytest.fixture(scope="module")
def mtp_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("bench") / "bench-qwen35moe-mtp.gguf"
    write_synthetic_gguf(path, replace(Q8_SPEC, mtp=True, name="bench-mtp"))
    return path


@pytest.fixture(scope="module")
def cpu():  # -> Hardware
    # a quiet host, whatever else runs beside the tests: its plans keep llama-server's thread count (no --threads)
    return replace(hardware_for("none"), cpu_busy_logical=0.0)


# --------------------------------------------------------------------------------------------- flag sets


def test_parse_set_maps_estimate_flags_and_passes_the_rest_through() -> None:
    fs = b.parse_set("q8=-c 4096 -np 2 -ctk q8_0 -ctv q8_0 -ub 1024 --n-gpu-layers all -t 4 --load-mode none")
    assert fs.name == "q8"
    assert fs.args == ("-c", "4096", "-np", "2", "-ctk", "q8_0", "-ctv", "q8_0", "-ub", "1024", "--n-gpu-layers",
                       "all", "-t", "4", "--load-mode", "none")
    assert fs.flags == ServerFlags(ctx_size=4096, parallel=2, cache_type_k="q8_0", cache_type_v="q8_0",
                                   ubatch_size=1024, n_gpu_layers=None)
    assert fs.extra == ("-t", "4", "--load-mode", "none")


def test_parse_set_reads_equals_form_and_bare_flash_attn() -> None:
    fs = b.parse_set("x=--ctx-size=8192 -fa --cpu-moe --spec-type draft-mtp")
    assert fs.flags is not None
    assert (fs.flags.ctx_size, fs.flags.flash_attn, fs.flags.cpu_moe, fs.flags.spec_type) == (
        8192, "on", True, "draft-mtp")
    assert b.parse_set("y=-fa off").flags.flash_attn == "off"  # type: ignore[union-attr]


@pytest.mark.parametrize("spec", ["a=-m other.gguf", "a=--port 9000", "a=--host 0.0.0.0", "a=--no-cache-prompt"])
def test_parse_set_refuses_options_tuner_owns(spec: str) -> None:
    with pytest.raises(TunerError, match="set by tuner itself"):
        b.parse_set(spec)


@pytest.mark.parametrize("spec", ["-c 4096", "=-c 4096", "bad name=-c 1", "a=-c", "a=-c many", "a=-ub 0"])
def test_parse_set_rejects_malformed_specs(spec: str) -> None:
    with pytest.raises(TunerError):
        b.parse_set(spec)


def test_two_sets_with_one_name_are_refused() -> None:
    with pytest.raises(TunerError, match="two flag sets"):
        b.check_unique_names([b.parse_set("a=-c 1024"), b.parse_set("a=-c 2048")])


def test_uses_fit_only_when_llama_server_is_left_to_size_things() -> None:
    assert b.uses_fit(b.DEFAULTS_ARGS) and b.uses_fit(b.DEFAULTS_ARGS, gpu=False)
    assert b.uses_fit(["-ctk", "q8_0"], gpu=False), "no -c: fit may shrink the context"
    assert b.uses_fit(["-c", "4096"]), "on a GPU without -ngl fit may still move weights"
    assert not b.uses_fit(["-c", "4096"], gpu=False)
    assert not b.uses_fit(["-c", "4096", "-ngl", "99"])
    assert not b.uses_fit(["-c", "4096", "--n-cpu-moe", "3"])
    assert not b.uses_fit(["-ctk", "q8_0", "--fit", "off"])
    assert not b.uses_fit(ServerFlags(ctx_size=4096).to_args())


def test_parse_depths_sorts_dedups_and_reads_k() -> None:
    assert b.parse_depths("32k, 0,8192,8k") == (0, 8192, 32768)
    with pytest.raises(TunerError):
        b.parse_depths("lots")
    with pytest.raises(TunerError):
        b.parse_depths("-5")


def test_bench_config_rejects_degenerate_runs() -> None:
    for bad in ({"repeat": 0}, {"gen_tokens": 1}, {"concurrency": 0}, {"depths": ()}):
        with pytest.raises(TunerError):
            b.BenchConfig(**bad)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------- memory


def test_a_set_that_does_not_fit_the_budget_is_refused_but_a_fit_set_is_not(moe_gguf: Path, cpu) -> None:
    layout = local_layout(moe_gguf)
    sets = [b.parse_set("big=-c 4096 -np 1 -ngl 0"), b.defaults_set()]
    est = b.estimate_for(layout, sets[0], cpu)
    budget = Budget("CPU", 0, 0, 0, est.host_total_bytes - 1)
    with pytest.raises(TunerError, match="'big' does not fit: RAM is 1 B short"):
        b.check_sets_fit(layout, sets, cpu, budget)
    ok = b.check_sets_fit(layout, sets[1:], cpu, budget)  # llama-server's own --fit decides for the defaults
    assert set(ok) == {b.DEFAULTS_NAME}


def test_quantized_kv_that_does_not_divide_the_head_size_is_refused_before_launch(tmp_path: Path, cpu) -> None:
    path = tmp_path / "head16.gguf"
    write_synthetic_gguf(path, SynthSpec())  # head_dim 16
    layout = local_layout(path)
    with pytest.raises(TunerError, match=r"q8_0 .*does not divide the head size 16"):
        b.check_sets_fit(layout, [b.parse_set("q8=-c 1024 -ctk q8_0 -ctv q8_0")], cpu, b.default_budget(cpu))


def test_servers_side_by_side_count_mapped_weights_once(moe_gguf: Path, cpu) -> None:
    layout = local_layout(moe_gguf)
    mapped = [b.parse_set("a=-c 1024 -np 1"), b.parse_set("b=-c 1024 -np 1 -ub 256")]
    loaded = [b.parse_set("a=-c 1024 -np 1 --load-mode none"), b.parse_set("b=-c 1024 -np 1 -ub 256 -lm none")]
    ests = [b.estimate_for(layout, fs, cpu) for fs in mapped]
    weights = ests[0].host.weights_bytes
    together_mapped = sum(b.host_bytes(e) for e in ests) - weights
    budget = Budget("CPU", 0, 0, 0, together_mapped + weights // 2)
    assert b.memory_problem(list(zip(mapped, ests, strict=True)), budget) is None
    problem = b.memory_problem(list(zip(loaded, ests, strict=True)), budget)
    assert problem is not None and problem.startswith("host RAM would need")
    assert b.decide_together(layout, loaded, cpu, budget)[0] is False


def test_tune_dimensions_follow_the_hardware_and_the_model(moe_gguf: Path, mtp_gguf: Path, cpu) -> None:
    base = b.TuneConfig(ServerFlags(ctx_size=2048, parallel=1, n_gpu_layers=0))
    names = [d.name for d in b.tune_dimensions(base, local_layout(moe_gguf), cpu)]
    assert "n_cpu_moe" not in names and "mtp" not in names  # no GPU; no MTP layer
    assert {"ubatch", "batch", "kv", "load_mode", "parallel"} <= set(names)
    mtp_dims = {d.name: d.values for d in b.tune_dimensions(base, local_layout(mtp_gguf), cpu)}
    assert mtp_dims["mtp"] == (None, "draft-mtp")
    assert mtp_dims["ubatch"][0] == 512  # the base's own value first
    gpu = hardware_for("rtx-4090")
    gpu_base = b.TuneConfig(ServerFlags(ctx_size=2048, parallel=1, n_cpu_moe=2))
    gpu_dims = {d.name: d.values for d in b.tune_dimensions(gpu_base, local_layout(moe_gguf), gpu)}
    assert gpu_dims["n_cpu_moe"][0] == 2 and set(gpu_dims["n_cpu_moe"]) == {2, 0, 1, 3, 4}  # 4 layers
    only = b.tune_dimensions(base, local_layout(moe_gguf), cpu, only=["kv"])
    assert [d.name for d in only] == ["kv"]
    with pytest.raises(TunerError, match="unknown tuning dimension"):
        b.tune_dimensions(base, local_layout(moe_gguf), cpu, only=["warp"])
    assert b.grid_size(only) == 2


def test_tune_config_args_and_labels() -> None:
    base = b.TuneConfig(ServerFlags(ctx_size=2048, parallel=1))
    other = replace(base, flags=base.flags.with_(ubatch_size=1024, cache_type_k="q8_0", cache_type_v="q8_0"),
                    threads=1, load_mode="none")
    assert other.label(base) == "ub1024+q8_0kv+t1+lm-none"
    assert base.label(base) == b.PLAN_NAME
    assert other.args()[-6:] == ("--fit", "off", "--threads", "1", "--load-mode", "none")


def test_a_tune_trial_that_drafts_keeps_the_servers_acceptance_counts_in_the_result() -> None:
    from tuner.bench.tune import measured_trial

    def timing(drafted: int | None, accepted: int | None) -> b.RequestTiming:
        return b.RequestTiming(32, 0, 10.0, 6, 50.0, 3200.0, 120.0, drafted, accepted)

    base = b.TuneConfig(ServerFlags(ctx_size=2048, parallel=1))
    mtp = replace(base, flags=base.flags.with_(spec_type="draft-mtp"))
    # the verdict round: two repeats at the tuning depth (1000), one at depth 0 that the trial's figures leave out
    samples = [b.Sample(0, "mtp", 1000, 0, 300.0, 12.0, 32, 1000, 6, requests=(timing(10, 7),), round=3),
               b.Sample(1, "mtp", 1000, 1, 320.0, 14.0, 32, 1000, 6, requests=(timing(6, 2),), round=3),
               b.Sample(2, "mtp", 0, 0, 400.0, 20.0, 32, 0, 6, requests=(timing(50, 50),), round=3)]
    trial = measured_trial("mtp", mtp, 3, "verdict", samples, "both")
    assert (trial.n_samples, trial.tg_tok_s, trial.pp_tok_s) == (2, 13.0, 310.0)
    d = json.loads(json.dumps(trial.to_dict()))
    assert d["draft_acceptance"] == {"drafted": 16, "accepted": 9, "rate": round(9 / 16, 4)}
    plain = [b.Sample(0, "plan", 1000, 0, 300.0, 12.0, 32, 1000, 6, round=3)]
    assert measured_trial("plan", base, 3, "mtp", plain, "both").to_dict()["draft_acceptance"] is None
    assert b.Trial("ub2048", base, 1, "ubatch", False, "RAM").to_dict()["draft_acceptance"] is None


# --------------------------------------------------------------------------------------------- prompts and stats


def test_prompt_source_gives_every_set_the_same_slice_per_key_and_never_reuses_one() -> None:
    calls: list[str] = []

    def tokenize(text: str) -> list[int]:  # a byte-level tokenizer, as the synthetic models have
        calls.append(text)
        return list(text.encode())

    src = b.PromptSource(tokenize)
    first = src.fresh(("bench", 0, 0), 100)
    assert src.fresh(("bench", 0, 0), 100) == first
    second = src.fresh(("bench", 0, 1), 100)
    assert len(first) == len(second) == 100 and first != second
    assert src.prefix(5000)[:100] == src.prefix(100)
    assert len(src.prefix(5000)) == 5000
    with pytest.raises(TunerError):
        src.fresh(("bench", 0, 0), 50)
    assert b.pseudo_text(50, 1) == b.pseudo_text(50, 1) != b.pseudo_text(50, 2)


def test_prompt_source_tokenizes_with_the_server_bound_last() -> None:
    used: list[str] = []

    def server(name: str):  # each "server" tokenizes the same way (one GGUF) and records that it was asked
        def tokenize(text: str) -> list[int]:
            used.append(name)
            return list(text.encode())
        return tokenize

    src = b.PromptSource()
    src.bind(server("first"))
    src.fresh(("k", 0), 10)
    src.bind(server("second"))  # the first one has been stopped (cycle mode): growing must not ask it
    src.fresh(("k", 1), 100_000)
    assert used[0] == "first" and set(used[1:]) == {"second"}


def test_stats_and_verdict_rank_by_the_objective(cpu) -> None:
    samples = [b.Sample(i, name, 0, i // 2, pp, tg, 32, 0, 8)
               for i, (name, pp, tg) in enumerate([("a", 100.0, 10.0), ("b", 400.0, 9.0), ("a", 120.0, 11.0),
                                                   ("b", 380.0, 8.0)])]
    ra = b.summarize(b.parse_set("a=-c 1024"), samples, 0)
    rb = b.summarize(b.parse_set("b=-c 1024"), samples, 0)
    assert ra.at(0).tg == b.Stats(10.5, 10.0, 11.0, 2)  # type: ignore[union-attr]
    assert b.verdict([ra, rb], "tg")["winner"] == "a"
    v = b.verdict([ra, rb], "both")
    assert v["winner"] == "b" and v["ratios_to_reference"]["b"]["pp"] == round(390 / 110, 3)


def _runs(name: str, by_depth: dict[int, list[tuple[float, float]]]) -> list[b.Sample]:
    """Samples of set ``name``: (tg, pp) per repeat, per depth."""
    return [b.Sample(0, name, depth, rep, pp, tg, 64, depth, 8) for depth, runs in by_depth.items()
            for rep, (tg, pp) in enumerate(runs)]


def test_the_comparison_covers_every_depth_with_the_spread_of_paired_runs(cpu) -> None:
    defaults = _runs("defaults", {0: [(10.0, 100.0), (12.0, 100.0), (11.0, 100.0)],
                                  4096: [(8.0, 80.0), (8.0, 90.0), (8.0, 70.0)]})
    plan = _runs("plan", {0: [(11.0, 110.0), (11.0, 100.0), (11.0, 105.0)],
                          4096: [(8.8, 72.0), (8.4, 95.0), (8.0, 77.0)]})
    rd = b.summarize(b.defaults_set(), defaults, 4096)
    rp = b.summarize(b.parse_set("plan=-c 8192"), plan, 4096)
    comp = b.verdict([rd, rp])["comparisons"][0]
    assert (comp["set"], comp["reference"]) == ("plan", "defaults")
    shallow, deep = comp["by_depth"]
    assert shallow["depth"] == 0 and shallow["tg"]["ratio"] == 1.0  # 11 / 11: the deepest depth alone hides this
    assert shallow["tg"]["paired"] == {"median": 1.0, "min": round(11 / 12, 3), "max": 1.1, "n": 3}
    assert shallow["tg"]["wins"] == 1 and shallow["tg"]["noise"] == round(2 / 11, 3)
    assert deep["pp"]["ratio"] == round(77 / 80, 3) and deep["pp"]["wins"] == 2  # lower median, most runs faster
    assert comp["worst"]["pp"] == {"ratio": round(77 / 80, 3), "depth": 4096, "paired_min": 0.9,
                                   "paired_max": 1.1}
    assert comp["at_least"] is False and comp["not_slower"] is True  # within the noise of the paired runs
    slower = b.summarize(b.parse_set("plan=-c 8192"), _runs("plan", {0: [(9.0, 90.0)] * 3,
                                                                     4096: [(7.0, 70.0)] * 3}), 4096)
    assert b.verdict([rd, slower])["comparisons"][0]["not_slower"] is False


def test_tuning_starts_from_the_plans_thread_count() -> None:
    from tuner.bench.tune import _threads_apart

    assert _threads_apart(["--rope-scaling", "yarn", "--threads", "1", "--fit", "off"]) == (
        1, ("--rope-scaling", "yarn", "--fit", "off"))
    assert _threads_apart(["--fit", "off"]) == (None, ("--fit", "off"))


def test_the_order_of_sets_rotates_every_repeat() -> None:
    assert [b.rotated(["a", "b", "c"], rep) for rep in range(4)] == [
        ["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"], ["a", "b", "c"]]
    assert b.rotated([], 3) == []


def test_results_land_in_model_and_hardware_folders_atomically(tmp_path: Path, cpu) -> None:
    path = b.results_path(tmp_path, "/m/Qwen3.5-35B-A3B-Q4_K_M-00001-of-00002.gguf", cpu, "20260101T000000Z")
    assert path.relative_to(tmp_path).parts[:1] == ("Qwen3.5-35B-A3B-Q4_K_M",)
    assert path.parent.name.startswith("cpu-") and path.name == "20260101T000000Z.json"
    b.write_json_atomic(path, {"a": 1})
    b.write_json_atomic(path, {"a": 2})
    assert json.loads(path.read_text()) == {"a": 2}
    assert [p.name for p in path.parent.iterdir()] == [path.name]


# --------------------------------------------------------------------------------------------- one measurement


class FakeServer:
    """Answers ``/completion`` as llama-server does for a benchmark client (tools/server/server-context.cpp:3326-3350,
    3540-3558 in llama.cpp's tree): a slot keeps its last prompt and reuses the common prefix up to a checkpoint 4
    tokens back (unless ``caches`` is False). Slot k
    processes prompts at 1000/(k+1) tok/s and generates at 100/(k+1) tok/s; the first generated token is free."""

    command = ("llama-server",)

    def __init__(self, caches: bool = True) -> None:
        self.caches = caches
        self.calls: list[dict[str, Any]] = []
        self.slots: dict[int, list[int]] = {}
        self.lock = threading.Lock()

    def post(self, path: str, payload: dict[str, Any], timeout_s: float = 0.0) -> dict[str, Any]:
        assert path == "/completion"
        prompt, slot, n = list(payload["prompt"]), payload["id_slot"], payload["n_predict"]
        with self.lock:
            self.calls.append(payload)
            held = self.slots.get(slot, [])
            common = 0
            while common < min(len(held), len(prompt)) and held[common] == prompt[common]:
                common += 1
            cache_n = max(min(common, len(prompt) - 1) - 4, 0) if self.caches and payload["cache_prompt"] else 0
            self.slots[slot] = prompt + [0] * n  # generated tokens: never a prompt byte
        prompt_n, slow = len(prompt) - cache_n, slot + 1
        return {"timings": {"cache_n": cache_n, "prompt_n": prompt_n, "prompt_ms": prompt_n * slow,
                            "prompt_per_second": 1000.0 / slow, "predicted_n": n, "predicted_ms": (n - 1) * 10.0 * slow,
                            "predicted_per_second": 100.0 / slow}}


def _live(name: str, server: FakeServer, n_ctx: int = 4096, slots: int = 1) -> b.LiveServer:
    return b.LiveServer(b.parse_set(f"{name}=-c {n_ctx} -np {slots}"), server, n_ctx, slots,  # type: ignore[arg-type]
                        unified=False)


def _bytes_tokenizer(text: str) -> list[int]:
    return list(text.encode())


def test_warm_up_then_fill_the_depth_and_measure_fresh_tokens_with_a_fixed_generation() -> None:
    cfg = b.BenchConfig(depths=(300,), repeat=2, prompt_tokens=40, gen_tokens=8)
    prompts = b.PromptSource(_bytes_tokenizer)
    servers = {"a": FakeServer(), "b": FakeServer()}
    lives = {name: _live(name, srv) for name, srv in servers.items()}
    for live in lives.values():
        b.warm_up(live, prompts, cfg)
        b.warm_up(live, prompts, cfg)
    assert [len(srv.calls) for srv in servers.values()] == [1, 1], "one warm-up per launch"
    samples = [b.measure_once(lives[name], prompts, cfg, depth=300, repeat=rep, seq=0, key=("bench", 0, rep))
               for rep in range(2) for name in ("a", "b")]
    prefix = prompts.prefix(300)
    for srv in servers.values():
        warm, fills, measured = srv.calls[0], srv.calls[1::2], srv.calls[2::2]
        assert warm["n_predict"] < cfg.gen_tokens and warm["prompt"] != prefix[:len(warm["prompt"])]
        for fill in fills:
            assert fill["prompt"] == prefix and fill["n_predict"] == 1 and fill["cache_prompt"]
        for m in measured:
            assert m["prompt"][:300] == prefix and len(m["prompt"]) == 340
            assert m["n_predict"] == 8 and m["ignore_eos"] is True and m["cache_prompt"] is True
            assert "stop" not in m and m["stream"] is False
        assert measured[0]["prompt"][300:] != measured[1]["prompt"][300:], "every repeat gets fresh tokens"
    assert [c["prompt"] for c in servers["a"].calls[2::2]] == [c["prompt"] for c in servers["b"].calls[2::2]], \
        "every set gets the same prompt for the same measurement"
    assert servers["a"].calls[3]["prompt"] == prefix and servers["a"].calls[1]["prompt"] == prefix
    for s in samples:
        assert (s.prompt_n, s.cache_n, s.predicted_n) == (44, 296, 8), "40 fresh + the 4 always re-evaluated"
        assert s.cache_hit and (s.pp_tok_s, s.tg_tok_s) == (1000.0, 100.0), "the server's own timings"


def test_a_depth_the_server_processed_again_is_counted_as_a_cache_miss() -> None:
    cfg = b.BenchConfig(depths=(1024,), repeat=1, prompt_tokens=16, gen_tokens=4)
    live = _live("a", FakeServer(caches=False))
    s = b.measure_once(live, b.PromptSource(_bytes_tokenizer), cfg, depth=1024, repeat=0, seq=0, key=("k",))
    assert s.prompt_n == 1024 + 16 and not s.cache_hit
    assert b.summarize(live.fs, [s], 1024).at(1024).cache_misses == 1  # type: ignore[union-attr]


def test_concurrent_requests_fill_every_slot_and_report_aggregate_and_per_request_speed() -> None:
    cfg = b.BenchConfig(depths=(100,), repeat=1, prompt_tokens=20, gen_tokens=5, concurrency=2)
    server = FakeServer()
    live = _live("np2", server, n_ctx=1024, slots=2)
    s = b.measure_once(live, b.PromptSource(_bytes_tokenizer), cfg, depth=100, repeat=0, seq=0, key=("k",))
    fills = [c for c in server.calls if c["n_predict"] == 1]
    assert sorted(c["id_slot"] for c in fills) == [0, 1] and all(len(c["prompt"]) == 100 for c in fills)
    assert len(s.requests) == 2 and all(r.prompt_n == 24 for r in s.requests)
    # aggregate: all tokens over the slowest request (slot 1 at half speed); per request: the median of the two
    assert (s.pp_tok_s, s.tg_tok_s) == (round(48 / 48 * 1000, 3), round(8 / 80 * 1000, 3))
    assert (s.per_request_pp_tok_s, s.per_request_tg_tok_s) == (750.0, 75.0)
    d = b.summarize(live.fs, [s], 100).at(100)
    assert d is not None and d.per_request_tg == b.Stats(75.0, 75.0, 75.0, 1)
    with pytest.raises(TunerError, match="needs -np 3"):
        b.measure_once(live, b.PromptSource(_bytes_tokenizer), replace(cfg, concurrency=3), depth=0, repeat=0,
                       seq=1, key=("k2",))


def test_slots_are_checked_before_anything_is_launched() -> None:
    b.check_slots([b.parse_set("a=-c 1024 -np 2"), b.defaults_set()], 2)
    b.check_slots([b.parse_set("auto=-c 1024")], 4)  # no -np: llama-server's auto, 4 slots
    with pytest.raises(TunerError, match=r"'a' has 2 slot.*needs -np 3"):
        b.check_slots([b.parse_set("a=-c 1024 -np 2")], 3)


# --------------------------------------------------------------------------------------------- real servers


def _sets_f16_q8(ctx: int = 2048) -> list[b.FlagSet]:
    return [b.parse_set(f"f16=-c {ctx} -np 1 -ctk f16 -ctv f16"),
            b.parse_set(f"q8=-c {ctx} -np 1 -ctk q8_0 -ctv q8_0")]


@pytest.mark.server
def test_two_kv_sets_run_interleaved_at_every_depth(server_bin: Path, moe_gguf: Path, cpu) -> None:
    cfg = b.BenchConfig(depths=(0, 512), repeat=3, prompt_tokens=32, gen_tokens=8)
    lines: list[str] = []
    run = b.run_bench(moe_gguf, _sets_f16_q8(), cfg, server_bin=server_bin, layout=local_layout(moe_gguf),
                      hardware=cpu, on_progress=lines.append)
    assert run.mode == "together" and len(run.launches) == 2
    order = [(s.set_name, s.depth, s.repeat) for s in run.samples]
    assert order == [(name, d, r) for d in (0, 512) for r in range(3)
                     for name in (("f16", "q8") if r % 2 == 0 else ("q8", "f16"))], "the order rotates every repeat"
    assert [s.seq for s in run.samples] == list(range(12))
    for s in run.samples:
        assert s.predicted_n == 8, "ignore_eos + n_predict: exactly the asked generation length"
        assert 32 <= s.prompt_n <= 32 + 8, "only the fresh tokens (and the few re-evaluated) are processed"
        assert s.cache_hit and s.cache_n >= s.depth - 8
        assert s.pp_tok_s > 0 and s.tg_tok_s > 0
    for r in run.results:
        assert r.ref_depth == 512 and [d.depth for d in r.by_depth] == [0, 512]
        for d in r.by_depth:
            assert d.tg.n == 3 and d.tg.min <= d.tg.median <= d.tg.max
        assert r.tg_tok_s == r.at(512).tg.median  # type: ignore[union-attr]
        assert r.launches[0].command[-8:] == r.fs.args
    assert any("f16 ready" in line for line in lines)


@pytest.mark.server
def test_cycle_mode_relaunches_each_repeat_and_keeps_the_order(server_bin: Path, moe_gguf: Path, cpu) -> None:
    cfg = b.BenchConfig(depths=(0,), repeat=2, prompt_tokens=16, gen_tokens=4)
    run = b.run_bench(moe_gguf, _sets_f16_q8(1024), cfg, server_bin=server_bin, layout=local_layout(moe_gguf),
                      hardware=cpu, together=False)
    assert run.mode == "cycle"
    assert [la.name for la in run.launches] == ["f16", "q8", "q8", "f16"]
    assert [s.set_name for s in run.samples] == ["f16", "q8", "q8", "f16"]


@pytest.mark.server
def test_depths_beyond_a_sets_context_are_skipped_and_noted(server_bin: Path, moe_gguf: Path, cpu) -> None:
    sets = [b.parse_set("small=-c 512 -np 1"), b.parse_set("large=-c 2048 -np 1")]
    cfg = b.BenchConfig(depths=(0, 1024), repeat=1, prompt_tokens=16, gen_tokens=4)
    run = b.run_bench(moe_gguf, sets, cfg, server_bin=server_bin, layout=local_layout(moe_gguf), hardware=cpu)
    assert run.result("small").skipped_depths == (1024,)
    assert [d.depth for d in run.result("large").by_depth] == [0, 1024]
    assert all(r.ref_depth == 0 for r in run.results), "the reference depth is one every set measured"
    assert any("small: depth(s) 1024 skipped" in n for n in run.notes)


@pytest.mark.server
def test_concurrency_sends_requests_at_once_and_aggregates_their_timings(server_bin: Path, moe_gguf: Path,
                                                                        cpu) -> None:
    cfg = b.BenchConfig(depths=(256,), repeat=1, prompt_tokens=16, gen_tokens=6, concurrency=2)
    sets = [b.parse_set("np2=-c 2048 -np 2 --no-kv-unified")]
    run = b.run_bench(moe_gguf, sets, cfg, server_bin=server_bin, layout=local_layout(moe_gguf), hardware=cpu)
    (s,) = run.samples
    assert s.concurrency == 2 and len(s.requests) == 2
    assert all(r.predicted_n == 6 and r.cache_n >= 256 - 8 for r in s.requests)
    expected_tg = sum(r.predicted_n - 1 for r in s.requests) / max(r.predicted_ms for r in s.requests) * 1000
    assert s.tg_tok_s == pytest.approx(expected_tg, rel=1e-3)
    assert run.results[0].by_depth[0].per_request_tg is not None
    too_many = b.BenchConfig(depths=(0,), repeat=1, prompt_tokens=16, gen_tokens=4, concurrency=3)
    with pytest.raises(TunerError, match="needs -np 3"):  # refused before a launch (this binary does not exist)
        b.run_bench(moe_gguf, sets, too_many, server_bin=moe_gguf.parent / "absent", layout=local_layout(moe_gguf),
                    hardware=cpu)


@pytest.mark.server
def test_tune_searches_far_fewer_launches_than_the_grid_and_never_launches_what_does_not_fit(
        server_bin: Path, mtp_gguf: Path, cpu) -> None:
    layout = local_layout(mtp_gguf)
    plan = plan_for(str(mtp_gguf), cpu, Wishes(ctx_size=2048)).plan
    # a budget between the plan's host memory and the same plan with a 2048-token ubatch: that one must be skipped
    host = {ub: estimate_memory(layout, plan.flags.with_(ubatch_size=ub)).host_total_bytes for ub in (512, 2048)}
    assert host[2048] > host[512]
    budget = Budget("CPU", 0, 0, 0, (host[512] + host[2048]) // 2)
    cfg = b.BenchConfig(repeat=2, prompt_tokens=24, gen_tokens=6)
    res = b.run_tune(mtp_gguf, plan.flags, cfg, server_bin=server_bin, layout=layout, hardware=cpu, budget=budget,
                     plan_extra=plan.extra_args)
    launched = {la.name for la in res.launches}
    measured = {t.name for t in res.trials if t.fits}
    skipped = {t.name for t in res.trials if not t.fits}
    assert "ub2048" in skipped and not skipped & launched
    assert launched == measured | {b.DEFAULTS_NAME}
    for t in res.trials:
        if t.fits:
            assert fits(estimate_memory(layout, t.config.flags), budget)
    assert len(res.launches) < res.grid_size / 4
    assert dict(res.dimensions)["mtp"] == (None, "draft-mtp")
    # every measured trial that drafts keeps the server's acceptance counts; the others have none. Whether the
    # drafting challenger fits depends on the incumbent the earlier (noisy) rounds chose (more slots, a larger
    # ubatch), so it is either measured or skipped with its reason (the counts: test_a_tune_trial_that_drafts_...).
    tried = [t for t in res.trials if t.config.flags.spec_type == "draft-mtp"]
    assert tried, "the mtp dimension was searched"
    for t in tried:
        got = t.to_dict()["draft_acceptance"]
        assert (got is not None and got["drafted"] > 0) if t.fits else (got is None and t.reason)
    assert all(t.to_dict()["draft_acceptance"] is None for t in res.trials if t.config.flags.spec_type is None)
    names = [la.name for la in res.launches]
    assert len(names) == len(set(names)), "each configuration launched once: the incumbent and plan stay up"
    depth = 2048 - cfg.room()
    verdict_round = max(s.round for s in res.samples)
    final = [s for s in res.samples if s.round == verdict_round]
    assert {s.set_name for s in final} == {b.DEFAULTS_NAME, b.PLAN_NAME, res.search_best}
    if res.winner.fs.name != b.PLAN_NAME:  # the verdict confirmed the search's best against the plan
        assert res.winner.fs.name == res.search_best
        assert b.score(res.winner.tg_tok_s, res.winner.pp_tok_s, "both") > b.score(res.plan.tg_tok_s,
                                                                                    res.plan.pp_tok_s, "both")
    # the search at the context the plan serves; the verdict there and at every shallower --depths depth
    assert {s.depth for s in final} == {0, depth} and {s.depth for s in res.samples if s.round < verdict_round} == {
        depth}
    ratio = res.ratio(res.defaults)
    assert ratio is not None and res.defaults is not None
    assert ratio["tg"] == round(res.winner.tg_tok_s / res.defaults.tg_tok_s, 3)
    doc = b.tune_document(res, model_path=mtp_gguf, layout=layout, hardware=cpu, build=None, cfg=cfg)
    assert doc["tune"]["launches"] == len(res.launches) and doc["tune"]["grid_size"] == res.grid_size
    assert doc["verdict"]["winner"] == res.winner.fs.name
    vs_defaults = doc["verdict"]["comparisons"][0]
    assert (vs_defaults["set"], vs_defaults["reference"]) == (res.winner.fs.name, b.DEFAULTS_NAME)
    assert [row["depth"] for row in vs_defaults["by_depth"]] == [0, depth]
    assert vs_defaults["by_depth"][-1]["tg"]["ratio"] == ratio["tg"] and vs_defaults["by_depth"][-1]["tg"]["n"] == 2
    print(f"\ntune: {len(res.launches)} launches for a grid of {res.grid_size}; best {res.search_best}, winner "
          f"{res.winner.fs.name}: "
          f"vs defaults {ratio}, vs plan {res.ratio(res.plan)}")


@pytest.mark.server
def test_run_benchmark_builds_measures_writes_and_reports_progress_through_callbacks(
        llama_build, moe_gguf: Path, cpu, tmp_path: Path) -> None:
    lines: list[str] = []
    stages: list[str] = []
    options = b.BenchOptions(sets=(b.parse_set("one=-c 1024 -np 1"),), out_dir=tmp_path, learn=False,
                             config=b.BenchConfig(depths=(0,), repeat=1, prompt_tokens=16, gen_tokens=4))
    report = b.run_benchmark(str(moe_gguf), cpu, Wishes(), options, on_progress=lines.append,
                             on_build_progress=lambda stage, *_: stages.append(stage))
    assert report.results_path.parent.parent.parent == tmp_path and report.profile is None
    assert json.loads(report.results_path.read_text()) == json.loads(json.dumps(report.document, default=str))
    assert report.plot_path == report.results_path.with_suffix(".png") and report.plot_problem is None
    assert [r["name"] for r in report.document["results"]] == ["one"]
    assert any(line.startswith("starting one: llama-server -c 1024 -np 1") for line in lines)
    assert any("one depth 0 #1" in line for line in lines)
    assert stages, "the build (found in the cache) reports through its own callback"
    assert report.document["llama_cpp"]["server_bin"] == str(llama_build.server_bin)


def test_bench_options_refuse_what_needs_no_work_to_refuse() -> None:
    with pytest.raises(TunerError, match="--objective must be one of tg, pp, both"):
        b.BenchOptions(objective="fast")
    with pytest.raises(TunerError, match="--tune searches around the plan"):
        b.BenchOptions(tune=True, sets=(b.parse_set("a=-c 1024"),))
    with pytest.raises(TunerError, match="two flag sets"):
        b.BenchOptions(sets=(b.parse_set("a=-c 1024"), b.parse_set("a=-c 2048")))
    with pytest.raises(TunerError, match=r"needs -np 2"):
        b.BenchOptions(sets=(b.parse_set("a=-c 1024 -np 1"),), config=b.BenchConfig(concurrency=2))


# ----------------------------------------------------------------------------------------- the file, not the card


def test_bench_plans_again_from_the_downloaded_header_or_stops_when_it_no_longer_fits(
        card_hub: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A card's plan is a prediction: bench downloads the file, reads its header (here: f16 experts where the card
    records q8_0) and measures the plan made for the file as it is; with RAM for the card's plan only, it stops
    with one line before building or launching anything."""
    import huggingface_hub.constants

    from tuner.bench.benchmark import resolve_model
    from tuner.planner import estimate_on

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    real = local_layout(card_hub.file)
    hw = replace(hardware_for("none"), ram_available_bytes=64 << 30)
    said: list[str] = []
    path, layout, plan = resolve_model(card_hub.card, hw, Wishes(ctx_size=1024), need_plan=True,
                                       on_progress=said.append)
    assert plan is not None and path.read_bytes() == card_hub.file.read_bytes()
    assert layout.weights_bytes == plan.candidate.layout.weights_bytes == real.weights_bytes
    assert len(said) == 1 and "re-planned from its header" in said[0]

    wishes = Wishes(ctx_size=1024, buffer_bytes=0)
    card_plan = plan_for(card_hub.card, hw, wishes).plan
    lean = card_plan.flags.with_(cache_ram_mib=0, ctx_checkpoints=0)
    ram = (estimate_on(card_plan.candidate.layout, lean, hw).host_total_bytes
           + estimate_on(real, lean, hw).host_total_bytes) // 2
    small = replace(hw, ram_available_bytes=ram, ram_total_bytes=ram)
    with pytest.raises(TunerError, match=r"Tiny-Q8_0\.gguf is not the file the plan was sized for.*no longer fits") \
            as caught:
        resolve_model(card_hub.card, small, wishes, need_plan=True)
    assert "\n" not in caught.value.one_line()

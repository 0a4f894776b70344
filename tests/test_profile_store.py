"""tuner.profile_store: identities, learning from results documents, invalidation, observations, the planner hook."""

from __future__ import annotations

import json
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from tuner import bench as b
from tuner.errors import TunerError
from tuner.estimate import ServerFlags
from tuner.hardware import Hardware, hardware_for
from tuner.models import local_layout, resolve_candidates
from tuner.planner import Wishes, plan_for
from tuner.profile_store import (
    ModelIdentity,
    ProfileStore,
    hub_origin,
    key_from_document,
    measured_hook,
    model_identity,
    read_observations,
)
from tuner.synth import SynthSpec, write_synthetic_gguf

SPEC = SynthSpec(head_dim=32, name="profile-model")


class FakeBuild:
    """What :func:`tuner.bench.build_summary` and the profile read of a llama.cpp build (commit, CUDA, options)."""

    def __init__(self, commit: str = "0c1e570", options: dict[str, str] | None = None) -> None:
        self.key, self.commit, self.cuda = "pypi-test-cpu", commit, False
        self.options = options if options is not None else {"GGML_NATIVE": "ON"}
        self.version_text, self.server_bin = f"version: 1 (commit {commit})", "llama-server"


@pytest.fixture
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ProfileStore:
    monkeypatch.setenv("TUNER_CONFIG_DIR", str(tmp_path / "config"))
    return ProfileStore()


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "profile-model.gguf"
    write_synthetic_gguf(path, SPEC)
    return path


@pytest.fixture(scope="module")
def cpu() -> Hardware:
    # a quiet host, whatever else runs beside the tests: its plans keep llama-server's thread count (no --threads)
    return replace(hardware_for("none"), cpu_busy_logical=0.0)


def document(model: Path, hardware: Hardware, sets: list[tuple[b.FlagSet, list[tuple[int, float, float]]]], *,
             build: Any = None, kind: str = "bench") -> dict[str, Any]:
    """A results document made by tuner.bench's own code from samples (depth, pp, tg)."""
    samples: list[b.Sample] = []
    for fs, rows in sets:
        for depth, pp, tg in rows:
            samples.append(b.Sample(len(samples), fs.name, depth, 0, pp, tg, 32, depth, 8))
    ref = max(s.depth for s in samples)
    results = tuple(b.summarize(fs, samples, ref) for fs, _ in sets)
    run = b.BenchRun(results, tuple(samples), b.BenchConfig(depths=tuple(sorted({s.depth for s in samples}))),
                     "together", "test", ())
    doc = b.bench_document(run, model_path=model, layout=local_layout(model), hardware=hardware,
                           build=build or FakeBuild(), model_identity=model_identity(model).to_dict())
    doc["kind"] = kind
    return doc


def test_model_identity_hashes_the_header_and_tells_files_apart(tmp_path: Path, model: Path) -> None:
    one = model_identity(model)
    assert one == model_identity(model)
    assert one.file_bytes == model.stat().st_size and len(one.header_sha256 or "") == 64
    other = tmp_path / "profile-model.gguf"
    write_synthetic_gguf(other, replace(SPEC, name="another-model"))
    assert not model_identity(other).matches(one)


def test_hub_identity_matches_by_repo_revision_name_and_size() -> None:
    path = "/c/hub/models--unsloth--Qwen3.5-35B-A3B-GGUF/snapshots/0123abcd/Q4_K_M/x-00001-of-00002.gguf"
    assert hub_origin(path) == ("unsloth/Qwen3.5-35B-A3B-GGUF", "0123abcd")
    assert hub_origin("/tmp/x.gguf") is None
    hub = ModelIdentity("x.gguf", 10, None, "o/r", "rev")
    assert hub.matches(ModelIdentity("x.gguf", 10, "abc", "o/r", "rev"))
    assert not hub.matches(ModelIdentity("x.gguf", 10, None, "o/r", "other"))


def test_learning_a_document_records_every_depth_and_the_best_at_the_deepest(store: ProfileStore, model: Path,
                                                                            cpu: Hardware) -> None:
    f16, q8 = b.parse_set("f16=-c 2048 -np 1"), b.parse_set("q8=-c 2048 -np 1 -ctk q8_0 -ctv q8_0")
    doc = document(model, cpu, [(f16, [(0, 900.0, 50.0), (1024, 600.0, 40.0)]),
                                (q8, [(0, 1000.0, 30.0), (1024, 700.0, 45.0)])])
    path = b.write_json_atomic(Path(store.path).parent / "r.json", doc)
    entry = store.learn_file(path)
    assert len(entry.measurements) == 4
    best = entry.best
    assert best is not None and (best.set_name, best.depth) == ("q8", 1024)
    eff = next(m for m in entry.measurements if m.set_name == "f16" and m.depth == 1024)
    assert eff.tg_bound_tok_s and eff.tg_efficiency == round(40.0 / eff.tg_bound_tok_s, 4)
    again = store.find(key_from_document(doc))
    assert again is not None and again.key.id() == entry.key.id()
    assert {m.results_file for m in again.measurements} == {str(path)}


def test_a_new_build_or_driver_invalidates_the_old_entry(store: ProfileStore, model: Path, cpu: Hardware,
                                                         tmp_path: Path) -> None:
    fs = b.parse_set("a=-c 1024 -np 1")
    store.learn(document(model, cpu, [(fs, [(0, 100.0, 10.0)])], build=FakeBuild("aaaaaaa")))
    other = tmp_path / "other.gguf"
    write_synthetic_gguf(other, replace(SPEC, name="other"))
    store.learn(document(other, cpu, [(fs, [(0, 50.0, 5.0)])], build=FakeBuild("aaaaaaa")))
    assert len(store.load()) == 2
    store.learn(document(model, cpu, [(fs, [(0, 120.0, 12.0)])], build=FakeBuild("bbbbbbb")))
    entries = store.load()
    assert len(entries) == 2, "the old build's entry for the same file is gone; the other model stays"
    mine = next(e for e in entries if e.key.model.name == model.name)
    assert mine.key.build.commit == "bbbbbbb" and [m.tg_tok_s for m in mine.measurements] == [12.0]
    store.learn(document(model, cpu, [(fs, [(0, 130.0, 13.0)])], build=FakeBuild("bbbbbbb", {"GGML_CUDA": "ON"})))
    assert sum(1 for e in store.load() if e.key.model.name == model.name) == 1, "build options count too"


def test_a_new_driver_or_a_changed_file_invalidates_but_another_repos_file_of_that_name_does_not(
        store: ProfileStore, model: Path, cpu: Hardware) -> None:
    fs = b.parse_set("a=-c 1024 -np 1 -ngl 99")
    card = hardware_for("rtx-4090")

    def on_driver(driver: str) -> Hardware:
        return replace(card, gpus=tuple(replace(g, driver_version=driver) for g in card.gpus))

    store.learn(document(model, cpu, [(fs, [(0, 10.0, 1.0)])]))
    store.learn(document(model, on_driver("550.54"), [(fs, [(0, 100.0, 10.0)])]))
    store.learn(document(model, on_driver("560.28"), [(fs, [(0, 122.0, 12.2)])]))
    drivers = sorted((e.key.hardware.driver or "cpu") for e in store.load())
    assert drivers == ["560.28", "cpu"], "the old driver's entry is gone; the CPU entry is another machine's"

    def with_identity(**ident: Any) -> dict[str, Any]:
        doc = document(model, cpu, [(fs, [(0, 10.0, 1.0)])])
        doc["model"]["identity"] = {"name": "q.gguf", "file_bytes": 10, **ident}
        return doc

    store.reset()
    store.learn(with_identity(header_sha256="aa", repo="org/one"))
    store.learn(with_identity(header_sha256="bb", repo="org/two"))
    assert len(store.load()) == 2, "same file name from two repos: two models"
    store.learn(with_identity(header_sha256="cc", repo="org/one"))
    assert sorted(e.key.model.header_sha256 or "" for e in store.load()) == ["bb", "cc"], "org/one's file changed"


def test_measured_hook_gives_the_measured_figure_for_the_measured_flags_only(store: ProfileStore, model: Path,
                                                                             cpu: Hardware) -> None:
    plan = plan_for(str(model), cpu, Wishes(ctx_size=2048, cache_type="q8_0")).plan
    q8 = b.flagset_from_flags("q8", plan.flags, (*plan.extra_args, "--fit", "off"))
    f16 = b.flagset_from_flags("f16", plan.flags.with_(cache_type_k="f16", cache_type_v="f16"), ("--fit", "off"))
    threads = b.FlagSet("t1", (*plan.flags.to_args(), "--threads", "1"), plan.flags, ("--threads", "1"))
    store.learn(document(model, cpu, [(q8, [(0, 800.0, 60.0), (1024, 500.0, 44.0)]),
                                      (f16, [(0, 700.0, 50.0), (1024, 400.0, 33.0)])], build=FakeBuild()))
    hook = measured_hook(cpu, FakeBuild(), store=store)
    cand = resolve_candidates(str(model))[0]
    got = hook(cand, plan.flags, cpu)
    assert got is not None and got.source == "measured"
    assert (got.tg_tok_s, got.pp_tok_s) == (44.0, 500.0), "the deepest depth measured"
    assert got.tg_bound_tok_s > 0 and got.efficiency == pytest.approx(44.0 / got.tg_bound_tok_s)
    assert hook(cand, plan.flags.with_(cache_ram_mib=0), cpu) is not None, "host RAM limits do not change speed"
    other = hook(cand, plan.flags.with_(ubatch_size=1024), cpu)
    assert other is not None and other.source == "rescaled", "an unmeasured flag set is only rescaled"
    assert measured_hook(cpu, FakeBuild("fffffff"), store=store)(cand, plan.flags, cpu) is None
    assert measured_hook(hardware_for("rtx-4090"), FakeBuild(), store=store)(cand, plan.flags, cpu) is None
    store.reset()
    store.learn(document(model, cpu, [(threads, [(0, 900.0, 70.0)])]))
    assert measured_hook(cpu, FakeBuild(), store=store)(cand, plan.flags, cpu) is None, \
        "a measurement with --threads is not what the plan's command runs"


def test_recommend_uses_the_measured_figure(store: ProfileStore, model: Path, cpu: Hardware) -> None:
    wishes = Wishes(ctx_size=2048, cache_type="q8_0")
    plan = plan_for(str(model), cpu, wishes).plan
    assert plan.predicted.source == "roofline"
    fs = b.flagset_from_flags("plan", plan.flags, ("--fit", "off"))
    store.learn(document(model, cpu, [(fs, [(1024, 321.0, 12.5)])]))
    planned = plan_for(str(model), cpu, wishes, measured=measured_hook(cpu, FakeBuild(), store=store)).plan
    assert planned.predicted.source == "measured" and planned.predicted.tg_tok_s == 12.5


def observation(model: Path, gpus: list[str], commit: str) -> dict[str, Any]:
    """An observation in tuner serve's format 1 (tuner.serve's module doc)."""
    return {"format": 1, "key": "k", "observed_at": "2026-01-01T00:00:00Z",
            "model": {"file": model.name, "path": str(model), "bytes": model.stat().st_size},
            "flags": ["--ctx-size", "2048"], "command": ["llama-server"],
            "build": {"key": "k", "commit": commit, "cuda": False},
            "gpus": [{"index": i, "name": n, "vram_total_bytes": 1} for i, n in enumerate(gpus)],
            "memory_check": {"compute": {"predicted_bytes": 100, "reported_bytes": 150, "diff_bytes": 50,
                                         "diff_ratio": 0.5, "within": False}},
            "mismatches": ["compute"]}


def test_serve_observations_join_the_matching_entry(store: ProfileStore, model: Path, cpu: Hardware) -> None:
    store.learn(document(model, cpu, [(b.parse_set("a=-c 1024"), [(0, 10.0, 1.0)])], build=FakeBuild("0c1e570")))
    obs_dir = store.path.parent / "observations"
    obs_dir.mkdir(parents=True)
    (obs_dir / "mine.json").write_text(json.dumps(observation(model, [], "0c1e57098bba")))
    (obs_dir / "other-gpu.json").write_text(json.dumps(observation(model, ["NVIDIA H100"], "0c1e570")))
    (obs_dir / "broken.json").write_text("{not json")
    assert len(list(read_observations(obs_dir))) == 2
    assert store.absorb_observations() == (1, 1)
    (entry,) = store.load()
    (obs,) = entry.memory_observations
    assert obs["file"] == "mine.json" and obs["kinds"]["compute"]["diff_bytes"] == 50
    assert obs["mismatches"] == ["compute"]
    assert store.absorb_observations() == (1, 1), "absorbing again replaces, not duplicates"
    assert len(store.load()[0].memory_observations) == 1


def test_a_corrupt_profile_says_how_to_recover_and_reset_removes_it(store: ProfileStore) -> None:
    store.path.parent.mkdir(parents=True, exist_ok=True)
    store.path.write_text("entries: [unclosed")
    with pytest.raises(TunerError, match="tuner profile reset"):
        store.load()
    assert store.reset() is True and store.load() == [] and store.reset() is False


def test_concurrent_writers_keep_each_others_entries(store: ProfileStore, model: Path, cpu: Hardware,
                                                      tmp_path: Path) -> None:
    docs = []
    for i in range(4):
        path = tmp_path / f"m{i}.gguf"
        write_synthetic_gguf(path, replace(SPEC, name=f"m{i}"))
        docs.append(document(path, cpu, [(b.parse_set("a=-c 1024"), [(0, 10.0 + i, 1.0)])]))
    threads = [threading.Thread(target=ProfileStore(store.path).learn, args=(d,)) for d in docs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(e.key.model.name for e in store.load()) == [f"m{i}.gguf" for i in range(4)]


def test_export_writes_a_copy_that_loads_the_same(store: ProfileStore, model: Path, cpu: Hardware,
                                                  tmp_path: Path) -> None:
    store.learn(document(model, cpu, [(b.parse_set("a=-c 1024"), [(0, 10.0, 1.0)])]))
    copy = store.export(tmp_path / "out" / "p.yaml")
    assert [e.to_dict() for e in ProfileStore(copy).load()] == [e.to_dict() for e in store.load()]


def test_measurements_keep_flags_that_rebuild_server_flags(store: ProfileStore, model: Path, cpu: Hardware) -> None:
    fs = b.parse_set("x=-c 2048 -np 2 -kvu -ub 256")
    entry = store.learn(document(model, cpu, [(fs, [(0, 10.0, 1.0)])]))
    assert entry.measurements[0].flags() == ServerFlags(ctx_size=2048, parallel=2, kv_unified=True, ubatch_size=256)
    assert entry.measurements[0].args == fs.args


def test_profile_show_prints_the_best_flags_speed_and_efficiency(store: ProfileStore, model: Path, cpu: Hardware,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    from tuner.cli import main

    assert main(["profile", "show"]) == 0
    assert "nothing measured yet" in capsys.readouterr().out
    fast = b.parse_set("fast=-c 2048 -np 1 -ub 256")
    store.learn(document(model, cpu, [(b.parse_set("slow=-c 2048 -np 1"), [(0, 500.0, 40.0), (1024, 300.0, 30.0)]),
                                      (fast, [(0, 400.0, 42.0), (1024, 350.0, 33.0)])]))
    assert main(["profile", "show"]) == 0
    out = capsys.readouterr().out
    assert model.name in out and "4 measurement(s)" in out
    assert "best at depth 1024: fast — tg 33.0 tok/s, pp 350.0 tok/s" in out
    assert "llama-server -c 2048 -np 1 -ub 256" in out and "roofline efficiency" in out
    assert main(["profile", "export", "--json"]) == 0
    exported = json.loads(capsys.readouterr().out)
    assert exported["entries"][0]["best"]["set_name"] == "fast"


def test_a_bench_result_rescales_a_neighbouring_plans_predicted_speed(store: ProfileStore, model: Path,
                                                                     cpu: Hardware) -> None:
    """A measurement of one flag set moves the prediction of the other flag sets of the same model file by its
    measured / predicted ratio: the planner's alternatives then rest on this machine's figures too."""
    from tuner.speed import predict_speed

    cand = resolve_candidates(str(model))[0]
    measured = ServerFlags(ctx_size=2048, parallel=1, cache_type_k="f16", cache_type_v="f16")
    pred = predict_speed(cand.layout, measured, cpu, depth_tokens=1024)
    fs = b.flagset_from_flags("m", measured, ("--fit", "off"))
    store.learn(document(model, cpu, [(fs, [(1024, round(pred.pp_tok_s * 0.5, 3), round(pred.tg_tok_s * 2.0, 3))])]))
    hook = measured_hook(cpu, FakeBuild(), store=store)
    neighbour = measured.with_(ctx_size=4096, ubatch_size=256)
    got = hook(cand, neighbour, cpu)
    base = predict_speed(cand.layout, neighbour, cpu)
    assert got.source == "rescaled"
    assert got.tg_tok_s == pytest.approx(base.tg_tok_s * 2.0, rel=1e-3)
    assert got.pp_tok_s == pytest.approx(base.pp_tok_s * 0.5, rel=1e-3)
    assert "rescaled by 1 tuner bench measurement of this model file (cpu): tg ×2.00, pp ×0.50" in got.notes
    assert hook(cand, measured, cpu).source == "measured", "the measured flag set keeps its measured figure"
    other = tmp_model(model.parent, "other-model")
    assert hook(resolve_candidates(str(other))[0], neighbour, cpu) is None, "another model file is not rescaled"
    plan = plan_for(str(model), cpu, Wishes(ctx_size=4096, cache_type="f16"), measured=hook).plan
    assert plan.flags != measured and plan.predicted.source == "rescaled"
    roof = predict_speed(cand.layout, plan.flags, cpu)
    assert plan.predicted.tg_tok_s == pytest.approx(roof.tg_tok_s * 2.0, rel=1e-3)


def tmp_model(folder: Path, name: str) -> Path:
    path = folder / f"{name}.gguf"
    if not path.exists():
        write_synthetic_gguf(path, replace(SPEC, name=name, n_layer=8))
    return path


def test_reset_forgets_calibration_points_and_serves_observations(store: ProfileStore, model: Path,
                                                                   cpu: Hardware) -> None:
    from tuner.corrections import MemoryPoint

    p = MemoryPoint(id="serve:k:CPU", device="CPU: x", build="0c1e570", cuda=False, shape="s", n_ubatch=512,
                    flags=("--ctx-size", "2048"), predicted={"compute": 100}, reported={"compute": 110})
    obs_dir = store.path.parent / "observations"
    obs_dir.mkdir(parents=True)
    (obs_dir / "mine.json").write_text(json.dumps({**observation(model, [], "0c1e570"), "points": [p.to_dict()]}))
    store.learn(document(model, cpu, [(b.parse_set("a=-c 1024"), [(0, 10.0, 1.0)])], build=FakeBuild("0c1e570")))
    store.absorb_observations()
    assert store.load_points() == [p], "serve's points are absorbed once"
    store.absorb_observations()
    assert len(store.load_points()) == 1
    assert store.reset() is True
    assert store.load_points() == [] and not list(obs_dir.glob("*.json"))
    store.absorb_observations()
    assert store.load_points() == [], "nothing comes back after a reset"


def test_a_format_1_profile_still_reads_and_is_rewritten_as_format_2(store: ProfileStore, model: Path,
                                                                     cpu: Hardware) -> None:
    import yaml

    store.learn(document(model, cpu, [(b.parse_set("a=-c 1024"), [(0, 10.0, 1.0)])]))
    data = yaml.safe_load(store.path.read_text())
    data["format"] = 1
    del data["calibration"]
    store.path.write_text(yaml.safe_dump(data))
    assert len(store.load()) == 1 and store.load_points() == []
    store.learn(document(model, cpu, [(b.parse_set("b=-c 1024"), [(0, 11.0, 1.0)])]))
    assert yaml.safe_load(store.path.read_text())["format"] == 2


def test_profile_show_lists_the_calibration_points(store: ProfileStore, capsys: pytest.CaptureFixture[str]) -> None:
    from tuner.cli import main
    from tuner.corrections import MemoryPoint

    store.add_points([MemoryPoint(id=f"calibrate:r:{i}:CPU", device="CPU: AMD EPYC", build="0c1e570abc", cuda=False,
                                  shape="qwen35moe-8L-512e-1234abcd", n_ubatch=512, flags=("--ctx-size", "4096"),
                                  predicted={"compute": 100}, reported={"compute": 101}, source="calibrate",
                                  observed_at=f"2026-01-01T00:00:0{i}") for i in range(3)])
    assert main(["profile", "show", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["calibration"]
    assert row == {"kind": "memory", "device": "CPU: AMD EPYC", "build": "0c1e570abc", "points": 3,
                   "shapes": ["qwen35moe-8L-512e-1234abcd"], "sources": ["calibrate"], "last": "2026-01-01T00:00:02"}
    assert main(["profile", "show"]) == 0
    assert "calibration points" in capsys.readouterr().out

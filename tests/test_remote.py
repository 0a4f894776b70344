"""Hub repos and local folders as quant ladders: real HTTP on loopback (tests/hubserver.py), real GGUF files."""

from __future__ import annotations

import importlib
import itertools
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from hubserver import LADDER_SPEC, LADDER_TYPES, FakeHub, write_card_quants, write_ladder, write_mmproj

from tuner import local, remote
from tuner.errors import TunerError
from tuner.gguf_file import NeedMoreBytes, parse_header, read_gguf
from tuner.hardware import GB, hardware_for
from tuner.local import dir_candidates
from tuner.models import parse_model_ref, resolve_candidates, resolve_layout
from tuner.planner import Wishes, plan_for, recommend
from tuner.quant_files import group_gguf_files, quant_label
from tuner.remote import HubRef, hub_candidates, parse_hub_ref
from tuner.synth import tensor_plan, vocabulary

REPO = "acme/Tiny-A1B-GGUF"
LABELS = {"F16", *LADDER_TYPES}
TOKEN = "hf_s3cret"


@pytest.fixture(scope="module")
def hub_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("hub")
    write_ladder(root / REPO)
    ladder = root / REPO
    (root / "acme/Docs-Only").mkdir(parents=True)
    (root / "acme/Docs-Only/README.md").write_text("no weights here\n", encoding="utf-8")
    (root / "acme/Docs-Only/config.json").write_text("{}\n", encoding="utf-8")
    private = root / "acme/Private-GGUF"
    private.mkdir(parents=True)
    shutil.copy(ladder / "Tiny-A1B-Q2_K.gguf", private / "Tiny-A1B-Q2_K.gguf")
    broken = root / "acme/Broken-GGUF"
    broken.mkdir(parents=True)
    data_offset = read_gguf(ladder / "Tiny-A1B-Q4_K_M.gguf").header_bytes
    with open(ladder / "Tiny-A1B-Q4_K_M.gguf", "rb") as src, open(broken / "Tiny-A1B-Q4_K_M.gguf", "wb") as dst:
        dst.write(src.read(data_offset + 4096))  # header intact, tensor data cut short
    with open(ladder / "Tiny-A1B-Q2_K.gguf", "rb") as src, open(broken / "Tiny-A1B-Q2_K.gguf", "wb") as dst:
        dst.write(src.read(300))  # cut inside the header
    partial = root / "acme/Partial-GGUF"
    partial.mkdir(parents=True)
    shutil.copy(ladder / "Tiny-A1B-Q8_0.gguf", partial / "Tiny-A1B-Q8_0.gguf")
    (partial / "F16").mkdir()
    for shard in ("00001", "00003"):
        name = f"F16/Tiny-A1B-F16-{shard}-of-00003.gguf"
        shutil.copy(ladder / name, partial / name)
    return root


@pytest.fixture(scope="module")
def hub(hub_root: Path) -> Iterator[FakeHub]:
    with FakeHub(hub_root, tokens={"acme/Private-GGUF": TOKEN}) as server:
        yield server


@pytest.fixture(autouse=True)
def hub_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, hub: FakeHub) -> None:
    """Point the tuner at the fake Hub, with an empty header cache and no token, per test."""
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(remote, "hub_token", _env_token_only)
    hub.reset_counters()


def _env_token_only() -> str | None:
    """HF_TOKEN alone: a token saved on the machine running the tests must not leak into them."""
    return os.environ.get("HF_TOKEN") or None


def _file_bytes(hub_root: Path, repo: str, suffix: str = ".gguf") -> dict[str, int]:
    d = hub_root / repo
    return {p.relative_to(d).as_posix(): p.stat().st_size for p in d.rglob(f"*{suffix}")}


def _header_size(path: Path) -> int:
    """Bytes of one file's header (metadata + tensor table + padding): its data offset."""
    want = 1 << 20
    with open(path, "rb") as fh:
        while True:
            fh.seek(0)
            try:
                return parse_header(fh.read(want)).data_offset
            except NeedMoreBytes as more:
                want = max(more.needed, 2 * want)


def _file_requests(hub: FakeHub) -> list[str]:
    return [r.path for r in hub.requests if "/resolve/" in r.path or r.path.startswith("/cdn-lfs/")]


# --- ladders ------------------------------------------------------------------------------------------------------

def test_hub_ladder_groups_shards_finds_mmproj_and_ranks_quality(hub: FakeHub, hub_root: Path) -> None:
    sizes = _file_bytes(hub_root, REPO)
    cands = hub_candidates(REPO)

    assert {c.quant for c in cands} == LABELS
    by_label = {c.quant: c for c in cands}
    split = by_label["F16"]
    assert split.files == tuple(f"F16/Tiny-A1B-F16-{i:05d}-of-00003.gguf" for i in (1, 2, 3))
    assert split.file_bytes == sum(sizes[f] for f in split.files)
    assert split.layout.file_bytes == split.file_bytes
    assert by_label["Q8_0"].files == ("Tiny-A1B-Q8_0.gguf",)
    n_tensors = len(tensor_plan(LADDER_SPEC, len(vocabulary(LADDER_SPEC)[0])))
    for c in cands:
        assert c.source == "hub" and c.repo == REPO and c.revision == hub.commit(REPO)
        assert c.mmproj == "mmproj-F16.gguf" and c.mmproj_bytes == sizes["mmproj-F16.gguf"]
        assert len(c.layout.tensors) == n_tensors and c.layout.n_layer == LADDER_SPEC.n_layer
        assert c.layout.arch == "qwen35moe" and c.card_key is None
    # best first, ranks n..1, by bits per weight when no card knows the model
    assert [c.quality_rank for c in cands] == list(range(len(cands), 0, -1))
    assert [c.quant for c in cands] == ["F16", "Q8_0", "Q6_K", "UD-Q4_K_XL", "Q4_K_M", "Q2_K"]
    assert all(a.bits_per_weight > b.bits_per_weight for a, b in itertools.pairwise(cands))


def test_hub_ladder_transfers_only_header_bytes(hub: FakeHub, hub_root: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # 64 KiB against files of 9-29 MB is the real ratio of the default 2 MiB first read to 10-70 GB quants.
    monkeypatch.setattr(remote, "REMOTE_FIRST_READ", 64 << 10)
    sizes = _file_bytes(hub_root, REPO)
    cands = hub_candidates(REPO)

    model_files = {f for c in cands for f in c.files}
    served = {k.removeprefix(REPO + "/"): v for k, v in hub.bytes_sent.items()}
    assert set(served) == model_files  # mmproj, README and imatrix never fetched
    for name, n in served.items():
        header = _header_size(hub_root / REPO / name)
        assert header <= n <= max(64 << 10, remote.header_size_hint(header)), name
    assert sum(served.values()) < 0.01 * sum(sizes[f] for f in model_files)


def test_one_header_sizes_the_first_read_of_the_others(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "REMOTE_FIRST_READ", 1024)  # the probe has to grow; the others should not
    hub_candidates(REPO)
    cdn_reads: dict[str, int] = {}
    for r in hub.requests:
        if r.path.startswith("/cdn-lfs/"):
            name = r.path.split("?")[0].rsplit("/", 1)[-1]
            cdn_reads[name] = cdn_reads.get(name, 0) + 1
    first_shards = [n for n in cdn_reads if "-0000" not in n or "-00001-of-" in n]
    grown = [n for n in first_shards if cdn_reads[n] > 1]
    assert len(first_shards) == len(LABELS) and len(grown) == 1  # only the probe took more than one request


def test_short_first_read_grows_until_the_header_is_complete(hub: FakeHub, hub_root: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "REMOTE_FIRST_READ", 1024)
    cand = hub_candidates(f"{REPO}:Q6_K")[0]

    local = read_gguf(hub_root / REPO / "Tiny-A1B-Q6_K.gguf")
    assert [(t.name, t.ggml_type.name, t.shape) for t in cand.layout.tensors] == \
        [(t.name, t.ggml_type.name, t.shape) for t in local.tensors]
    ranges = [r.header("Range") for r in hub.requests if r.path.startswith("/cdn-lfs/")]
    assert ranges[0] == "bytes=0-1023" and len(ranges) >= 2
    assert hub.bytes_sent[f"{REPO}/Tiny-A1B-Q6_K.gguf"] < local.header_bytes + remote.REMOTE_MIN_GROW + 1024


def test_later_ranges_go_straight_to_the_cdn_url(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(remote, "REMOTE_FIRST_READ", 1024)
    hub_candidates(f"{REPO}:Q2_K")
    file_paths = _file_requests(hub)
    assert sum("/resolve/" in p for p in file_paths) == 1  # one redirect, then the CDN URL directly
    assert sum(p.startswith("/cdn-lfs/") for p in file_paths) >= 2


def test_second_read_is_served_from_the_disk_cache(hub: FakeHub, tmp_path: Path) -> None:
    first = hub_candidates(REPO)
    assert hub.total_bytes_sent() > 0
    commit = hub.commit(REPO)
    cached = tmp_path / "cache" / "hub-headers" / REPO / commit
    assert (cached / "Tiny-A1B-Q8_0.gguf.json").is_file()
    assert (cached / "F16" / "Tiny-A1B-F16-00003-of-00003.gguf.json").is_file()
    hub.reset_counters()

    second = hub_candidates(REPO)

    assert hub.total_bytes_sent() == 0 and _file_requests(hub) == []
    assert [(c.quant, c.file_bytes, c.layout.bytes_by_class()) for c in second] == \
        [(c.quant, c.file_bytes, c.layout.bytes_by_class()) for c in first]


def test_header_stats_count_shards_cache_hits_and_bytes_fetched(hub: FakeHub) -> None:
    listing = remote.list_hub_repo(REPO)
    groups = list(listing.grouped().complete)
    n_shards = sum(len(g.files) for g in groups)
    headers, stats = remote.read_hub_headers(listing, groups)
    assert len(headers) == len(groups) and n_shards == 8
    assert stats == remote.HeaderStats(shards=n_shards, from_cache=0, bytes_fetched=hub.total_bytes_sent())
    hub.reset_counters()
    _, again = remote.read_hub_headers(listing, groups)
    assert again == remote.HeaderStats(shards=n_shards, from_cache=n_shards, bytes_fetched=0)
    assert hub.total_bytes_sent() == 0


def test_cached_repo_is_read_offline(hub_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub(hub_root) as short_lived:
        monkeypatch.setenv("HF_ENDPOINT", short_lived.endpoint)
        online = hub_candidates(REPO)
        endpoint = short_lived.endpoint
    monkeypatch.setenv("HF_ENDPOINT", endpoint)  # nothing listens there any more

    offline = hub_candidates(REPO)

    assert [c.quant for c in offline] == [c.quant for c in online]
    with pytest.raises(TunerError, match=r"cannot reach .* never listed before"):
        hub_candidates("acme/Docs-Only")


def test_quant_suffix_reads_only_that_quant(hub: FakeHub) -> None:
    cands = hub_candidates(f"{REPO}:q4_k_m")
    assert [c.quant for c in cands] == ["Q4_K_M"]
    assert set(hub.bytes_sent) == {f"{REPO}/Tiny-A1B-Q4_K_M.gguf"}


def test_revision_is_resolved_to_a_commit(hub: FakeHub) -> None:
    commit = hub.commit(REPO)
    cand = hub_candidates(f"{REPO}@{commit}:Q8_0")[0]
    assert cand.revision == commit
    assert f"/resolve/{commit}/" in cand.layout.source
    with pytest.raises(TunerError, match=r"has no revision 'no-such-branch'"):
        hub_candidates(f"{REPO}@no-such-branch:Q8_0")


def test_hf_token_is_sent_as_a_bearer_header(hub: FakeHub, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    cand = hub_candidates("acme/Private-GGUF")[0]
    assert cand.quant == "Q2_K"
    api_and_resolve = [r for r in hub.requests if r.path.startswith("/api/models/") or "/resolve/" in r.path]
    assert api_and_resolve and all(r.header("Authorization") == f"Bearer {TOKEN}" for r in api_and_resolve)
    cdn = [r for r in hub.requests if r.path.startswith("/cdn-lfs/")]  # another host: the token stays home
    assert cdn and all(r.header("Authorization") is None for r in cdn)


def test_private_repo_without_token_is_a_one_line_error(hub: FakeHub) -> None:
    with pytest.raises(TunerError) as err:
        hub_candidates("acme/Private-GGUF")
    assert "not found" in str(err.value) and "HF_TOKEN" in str(err.value) and "\n" not in err.value.one_line()


@pytest.mark.parametrize(("ref", "message"), [
    ("acme/No-Such-Repo", r"^Hugging Face repo acme/No-Such-Repo not found at http://127\.0\.0\.1:\d+ "),
    ("acme/Docs-Only", r"^acme/Docs-Only holds no GGUF model files$"),
    (f"{REPO}:IQ1_S", r"^acme/Tiny-A1B-GGUF has no IQ1_S GGUF \(it has: F16, Q2_K, Q4_K_M, Q6_K, Q8_0, "
                      r"UD-Q4_K_XL\)$"),
    ("acme/Broken-GGUF:Q4_K_M", r"Tiny-A1B-Q4_K_M\.gguf is truncated: tensor data needs \d+ bytes but the file"),
    ("acme/Broken-GGUF:Q2_K", r"Tiny-A1B-Q2_K\.gguf is truncated: the header ends at byte 300"),
    ("acme/Partial-GGUF:F16", r"F16 is split into 3 files but 1 are missing"),
])
def test_hub_errors_are_one_line_tuner_errors(hub: FakeHub, ref: str, message: str) -> None:
    with pytest.raises(TunerError, match=message) as err:
        hub_candidates(ref)
    assert "\n" not in str(err.value)


def test_incomplete_split_is_left_out_of_the_ladder(hub: FakeHub) -> None:
    assert [c.quant for c in hub_candidates("acme/Partial-GGUF")] == ["Q8_0"]


def test_server_that_ignores_range_still_yields_the_header(hub_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with FakeHub(hub_root, ignore_range=True) as whole_files:
        monkeypatch.setenv("HF_ENDPOINT", whole_files.endpoint)
        cand = hub_candidates(f"{REPO}:Q2_K")[0]
    local = read_gguf(hub_root / REPO / "Tiny-A1B-Q2_K.gguf")
    assert [(t.name, t.nbytes) for t in cand.layout.tensors] == [(t.name, t.nbytes) for t in local.tensors]
    assert cand.file_bytes == local.file_bytes


# --- references ---------------------------------------------------------------------------------------------------

def test_resolve_layout_of_a_ladder_asks_for_a_quant_without_reading_headers(hub: FakeHub) -> None:
    with pytest.raises(TunerError, match=r"comes in 6 quants; name one as acme/Tiny-A1B-GGUF:QUANT \(F16, Q2_K"):
        resolve_layout(REPO)
    assert hub.total_bytes_sent() == 0
    assert resolve_layout(f"{REPO}:Q2_K").file_bytes == (Path(hub.root) / REPO / "Tiny-A1B-Q2_K.gguf").stat().st_size
    assert resolve_layout(f"{REPO}:UD-Q4_K_XL").arch == "qwen35moe"


def test_resolve_candidates_dispatches_on_the_reference(hub: FakeHub, hub_root: Path) -> None:
    ladder_dir = hub_root / REPO
    assert parse_model_ref(str(ladder_dir)).kind == "dir"
    assert parse_model_ref(f"{ladder_dir}:Q8_0").kind == "dir"
    assert parse_model_ref(str(ladder_dir / "Tiny-A1B-Q8_0.gguf")).kind == "file"
    assert parse_model_ref(REPO).kind == "hub"
    assert parse_model_ref("qwen3.5-35b-a3b:Q4_K_M").kind == "card"
    assert parse_model_ref(None).target == "qwen3.5-35b-a3b"

    local = resolve_candidates(str(ladder_dir / "Tiny-A1B-Q8_0.gguf"))
    assert [(c.quant, c.source) for c in local] == [("Q8_0", "local")]
    assert local[0].mmproj == str(ladder_dir / "mmproj-F16.gguf")  # F16 first, as in a folder or a repo
    assert [c.quant for c in resolve_candidates(f"{ladder_dir}:q6_k")] == ["Q6_K"]
    assert {c.quant for c in resolve_candidates(f"{REPO}")} == LABELS
    with pytest.raises(TunerError, match="is one GGUF file; drop ':Q8_0'"):
        resolve_candidates(f"{ladder_dir / 'Tiny-A1B-Q8_0.gguf'}:Q8_0")
    with pytest.raises(TunerError, match="no such file"):
        resolve_candidates(str(ladder_dir / "missing.gguf"))


def test_resolve_layout_of_a_local_folder_asks_for_a_quant_without_reading_headers(
        hub_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ladder_dir = hub_root / REPO

    def no_reads(path: object) -> None:
        raise AssertionError(f"read {path}")

    with monkeypatch.context() as m:
        m.setattr(local, "read_gguf", no_reads)
        with pytest.raises(TunerError, match=rf"comes in 6 quants; name one as {ladder_dir}:QUANT \(F16, Q2_K"):
            resolve_layout(str(ladder_dir))
    assert resolve_layout(f"{ladder_dir}:Q2_K").file_bytes == (ladder_dir / "Tiny-A1B-Q2_K.gguf").stat().st_size


def test_local_folder_is_a_ladder_too(hub_root: Path) -> None:
    ladder_dir = hub_root / REPO
    cands = dir_candidates(ladder_dir)
    assert [c.quant for c in cands] == ["F16", "Q8_0", "Q6_K", "UD-Q4_K_XL", "Q4_K_M", "Q2_K"]
    split = cands[0]
    assert split.files == tuple(str(ladder_dir / f"F16/Tiny-A1B-F16-{i:05d}-of-00003.gguf") for i in (1, 2, 3))
    assert split.file_bytes == sum(Path(f).stat().st_size for f in split.files)
    assert all(c.source == "local" and c.mmproj == str(ladder_dir / "mmproj-F16.gguf") for c in cands)
    with pytest.raises(TunerError, match="holds no GGUF model files"):
        dir_candidates(hub_root / "acme/Docs-Only")


@pytest.mark.parametrize(("name", "label"), [
    ("Qwen3.5-35B-A3B-Q4_K_M.gguf", "Q4_K_M"),
    ("Qwen3.5-35B-A3B-UD-Q4_K_XL.gguf", "UD-Q4_K_XL"),
    ("Qwen_Qwen3.5-35B-A3B-IQ4_XS.gguf", "IQ4_XS"),
    ("BF16/Qwen3.5-35B-A3B-BF16-00001-of-00002.gguf", "BF16"),
    ("Qwen3.5-35B-A3B-Q8_0.gguf", "Q8_0"),
    ("Qwen3.5-35B-A3B-MXFP4_MOE.gguf", "MXFP4_MOE"),
    ("qwen3.5-35b-a3b-q5_k_m.gguf", "Q5_K_M"),
    ("UD-Q2_K_XL/Qwen3.5-122B-A10B-UD-Q2_K_XL-00002-of-00003.gguf", "UD-Q2_K_XL"),
    ("model.i1-Q4_K_S.gguf", "Q4_K_S"),
    ("my-model.gguf", "my-model"),
])
def test_quant_label_is_read_from_the_file_name(name: str, label: str) -> None:
    assert quant_label(name) == label


def test_grouping_keeps_mmproj_and_imatrix_apart() -> None:
    grouped = group_gguf_files([
        ("a-Q4_K_M.gguf", 10), ("Q8_0/a-Q8_0-00002-of-00002.gguf", 5), ("Q8_0/a-Q8_0-00001-of-00002.gguf", 6),
        ("mmproj-BF16.gguf", 3), ("mmproj-F16.gguf", 2), ("imatrix.gguf", 1), ("README.md", 1),
    ])
    assert [(g.label, g.files, g.file_bytes) for g in grouped.complete] == [
        ("Q8_0", ("Q8_0/a-Q8_0-00001-of-00002.gguf", "Q8_0/a-Q8_0-00002-of-00002.gguf"), 11),
        ("Q4_K_M", ("a-Q4_K_M.gguf",), 10),
    ]
    assert grouped.pick_mmproj() == ("mmproj-F16.gguf", 2)


@pytest.mark.parametrize(("ref", "want"), [
    ("owner/name", HubRef("owner/name")),
    ("owner/name:Q4_K_M", HubRef("owner/name", None, "Q4_K_M")),
    ("owner/name@main:UD-Q4_K_XL", HubRef("owner/name", "main", "UD-Q4_K_XL")),
    ("owner/na.me-GGUF@0123abc", HubRef("owner/na.me-GGUF", "0123abc")),
])
def test_hub_refs_parse(ref: str, want: HubRef) -> None:
    assert parse_hub_ref(ref) == want


@pytest.mark.parametrize("ref", ["owner", "owner/../x", "/abs/path/model", "owner/name:"])
def test_bad_hub_refs_are_refused(ref: str) -> None:
    with pytest.raises(TunerError, match="neither a local path nor a Hugging Face repo"):
        parse_hub_ref(ref)


# --- a real-size ladder: Qwen3.5-35B-A3B quants with real shapes, recipes and 13 MB headers ---------------------

REAL_REPO = "acme/Qwen3.5-35B-A3B-GGUF"
REAL_QUANTS = ("Q8_0", "Q4_K_M", "IQ4_XS")


@pytest.fixture(scope="module")
def real_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    root = tmp_path_factory.mktemp("real-hub")
    write_card_quants(root / REAL_REPO, "qwen3.5-35b-a3b", REAL_QUANTS)
    write_mmproj(root / REAL_REPO / "mmproj-F16.gguf")
    with FakeHub(root) as server:
        yield server


def test_recommend_over_a_real_size_remote_ladder_reads_headers_only_and_matches_the_card(
        real_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, record_property: pytest.RecordProperty) -> None:
    monkeypatch.setenv("HF_ENDPOINT", real_hub.endpoint)
    hw = replace(hardware_for("rtx-5080"), ram_total_bytes=64 << 30, ram_available_bytes=64 << 30,
                 ram_bandwidth_bytes_s=50 * GB, cpu_physical_cores=8)
    sizes = _file_bytes(real_hub.root, REAL_REPO)
    t0 = time.perf_counter()
    importlib.import_module("huggingface_hub.hf_api")  # once per process, whatever the ladder: timed apart
    importlib.import_module("httpx")
    imports = time.perf_counter() - t0

    t0 = time.perf_counter()
    rec = plan_for(REAL_REPO, hw, Wishes())  # cold: listing, three 13 MB headers over HTTP, then the planner
    cold = time.perf_counter() - t0
    sent = dict(real_hub.bytes_sent)
    real_hub.reset_counters()
    t0 = time.perf_counter()
    plan_for(REAL_REPO, hw, Wishes())  # warm: headers from the disk cache
    warm = time.perf_counter() - t0

    models = {f"{REAL_REPO}/Qwen3.5-35B-A3B-{q}.gguf" for q in REAL_QUANTS}
    assert set(sent) == models and real_hub.total_bytes_sent() == 0
    headers = {name: _header_size(real_hub.root / name) for name in sent}
    for name, n in sent.items():  # the probe's prefix doubles until its header is whole, the others are sized by it
        assert 10 << 20 < headers[name] <= n <= 2 * headers[name] + remote.REMOTE_MIN_GROW, name
    assert sum(n > remote.header_size_hint(headers[name]) for name, n in sent.items()) <= 1
    model_bytes = sum(sizes[f.removeprefix(REAL_REPO + "/")] for f in models)
    assert sum(sent.values()) < 0.001 * model_bytes  # ~40 MB of ~77 GB

    # the plan read from the Hub is the plan the card computes offline for the same quants
    assert rec.plan.candidate.card_key == "qwen3.5-35b-a3b" and rec.plan.candidate.source == "hub"
    card = recommend([c for c in resolve_candidates(None) if c.quant in REAL_QUANTS], hw, Wishes())
    assert (rec.plan.quant, rec.plan.flags) == (card.plan.quant, card.plan.flags)
    assert rec.plan.estimate.to_dict()["memory"] == card.plan.estimate.to_dict()["memory"]
    assert [(a.quant, a.flags, why) for a, why in rec.alternatives] == \
        [(a.quant, a.flags, why) for a, why in card.alternatives]
    assert rec.plan.candidate.mmproj == "mmproj-F16.gguf"

    record_property("remote_recommend_imports_s", round(imports, 3))
    record_property("remote_recommend_cold_s", round(cold, 3))
    record_property("remote_recommend_warm_s", round(warm, 3))
    record_property("remote_recommend_bytes", sum(sent.values()))
    print(f"\nrecommend over {len(REAL_QUANTS)} remote Qwen3.5-35B-A3B quants ({model_bytes / 1e9:.1f} GB): "
          f"cold {cold:.2f} s reading {sum(sent.values()) / 1e6:.1f} MB of headers (+{imports:.2f} s of imports); "
          f"warm {warm:.2f} s")

"""The grammar checks and bounds behind the hostile-input suite, in-process: names that must never become paths,
the path-under-root guard, header reads that never grow past their limit, and the metadata table."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from ggufbytes import ARR, BASE_KVS, KV, STR, U8, array, gstr, header, with_kv
from hubserver import FakeHub, Misbehave

from tuner import hub_api, remote
from tuner.errors import TunerError
from tuner.gguf_file import MAX_HEADER_BYTES, NeedMoreBytes, parse_growing, parse_header, split_name
from tuner.gguf_schema import check_metadata
from tuner.synth import SynthSpec, write_synthetic_gguf
from tuner.untrusted import (
    check_commit,
    check_repo_id,
    check_repo_path,
    check_revision,
    path_under,
    shown,
    visible,
)

COMMIT = "0123456789abcdef0123456789abcdef01234567"


# --- grammars -----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("repo", ["unsloth/Qwen3.5-35B-A3B-GGUF", "a/b", "Qwen/Qwen3.6-27B", "o_1/n.a-m_e"])
def test_real_repo_ids_pass(repo: str) -> None:
    assert check_repo_id(repo) == repo


@pytest.mark.parametrize("repo", ["owner/.", "owner/..", "./x", "owner", "a/b/c", "owner/-x", "owner/x-", "o/a--b",
                                  "o/x.git", "/abs", "o/" + "x" * 97, "o/\x1b[31m", "ówner/x", 7, None])
def test_invalid_repo_ids_are_refused_naming_the_value(repo: object) -> None:
    with pytest.raises(TunerError, match=r"invalid Hugging Face repo id") as err:
        check_repo_id(repo)
    assert shown(repo) in str(err.value)


@pytest.mark.parametrize("rev", ["main", "v1.0", "refs/pr/12", "refs/convert/parquet", COMMIT, "release+2"])
def test_real_revisions_pass(rev: str) -> None:
    assert check_revision(rev) == rev


@pytest.mark.parametrize("rev", ["..", "../x", "a//b", "/main", "main/", ".hidden", "x.lock", "", "a b", "x" * 256,
                                 "\x1b", "main\n"])
def test_invalid_revisions_are_refused(rev: str) -> None:
    with pytest.raises(TunerError, match="invalid revision"):
        check_revision(rev)


@pytest.mark.parametrize("sha", ["/abs/path", "../../../../x", "", "ABCDEF" * 7, COMMIT[:-1], COMMIT + "0", None, 42])
def test_a_commit_is_forty_hex_digits(sha: object) -> None:
    with pytest.raises(TunerError, match="is not a commit id"):
        check_commit(sha, where="here")


@pytest.mark.parametrize("path", ["a.gguf", "BF16/a-BF16-00001-of-00002.gguf", "dir with space/ünïcode.gguf"])
def test_real_repo_paths_pass(path: str) -> None:
    assert check_repo_path(path, where="listing") == path


@pytest.mark.parametrize("path", ["../x.gguf", "a/../../x.gguf", "/etc/passwd", "a//b.gguf", "a/./b.gguf", "a/",
                                  "a\\..\\b.gguf", "x\x00.gguf", "\x1b[2Jx.gguf", "\u202egguf.exe", "x" * 256 + ".gguf",
                                  "/".join(["d"] * 40), "", None, 3])
def test_repo_paths_that_could_leave_a_folder_are_refused(path: object) -> None:
    with pytest.raises(TunerError, match="refusing file name"):
        check_repo_path(path, where="listing")


@pytest.mark.parametrize(("name", "message"), [
    ("m-00001-of-00000.gguf", "shard 1 of 0"), ("m-00000-of-00002.gguf", "shard 0 of 2"),
    ("m-00003-of-00002.gguf", "shard 3 of 2"), ("m-00001-of-02000.gguf", "shard 1 of 2000"),
])
def test_impossible_shard_numbers_are_refused(name: str, message: str) -> None:
    with pytest.raises(TunerError, match=message):
        split_name(name)
    assert split_name("m-00002-of-00003.gguf") == ("m", 2, 3) and split_name("m.gguf") is None


def test_path_under_keeps_paths_inside_their_root(tmp_path: Path) -> None:
    root = tmp_path / "cache"
    root.mkdir()
    (tmp_path / "elsewhere").mkdir()
    (root / "link").symlink_to(tmp_path / "elsewhere")
    assert path_under(root, "a", "b.json", what="x") == root.resolve() / "a" / "b.json"
    for parts in (("/abs", "x"), ("..", "x"), ("a", "../../x"), ("link", "x"), (".",)):
        with pytest.raises(TunerError, match=r"refusing x: .* leads outside"):
            path_under(root, *parts, what="x")


def test_visible_escapes_control_and_bidi_characters_only() -> None:
    assert visible("Qwen3.5 [bold] ünï") == "Qwen3.5 [bold] ünï"
    assert visible("a\x1b[31mb\x07\x9b\u202ec\r\n") == "a\\x1b[31mb\\x07\\x9b\\u202ec\\x0d\\x0a"


def test_shown_quotes_and_cuts_long_values() -> None:
    assert shown("\x1b") == "'\\x1b'"
    assert len(shown("x" * 10_000)) == 80


# --- header reads never grow past their limit ----------------------------------------------------------------------

def test_local_reads_stop_at_the_header_limit_whatever_the_header_claims() -> None:
    n = (1 << 22) - 1  # u8 arrays under every per-array limit, 17 of them: past the header limit together
    parts = [header(BASE_KVS, n_kv=len(BASE_KVS) + 17, pad=False)]
    for i in range(17):
        parts += [gstr(f"a.k{i}") + struct.pack("<I", ARR) + array(U8, [], claimed=n), bytes(n)]
    data = b"".join(parts)
    asked: list[int] = []

    def read_prefix(size: int) -> bytes:  # a file of 1 TB: the header, then zeros
        asked.append(size)
        return data[:size] + bytes(max(0, size - len(data)))

    with pytest.raises(TunerError, match=r"GGUF key 'a\.k15': the header would be larger than the limit of "
                                         r"67108864 bytes"):
        parse_growing(read_prefix, 1 << 40, shard=0, source="f.gguf", first_read=16 << 20)
    assert max(asked) <= MAX_HEADER_BYTES


def test_the_parser_asks_for_more_only_up_to_the_limit() -> None:
    data = header([*BASE_KVS, KV("tokenizer.ggml.tokens", ARR, raw=array(STR, [], claimed=1000))], pad=False)
    with pytest.raises(NeedMoreBytes) as more:
        parse_header(data, source="f.gguf")
    assert len(data) < more.value.needed <= MAX_HEADER_BYTES


# --- the metadata table ----------------------------------------------------------------------------------------------

def test_real_models_pass_the_metadata_checks(tmp_path: Path) -> None:
    from tuner.gguf_file import read_gguf

    for spec in (SynthSpec(), SynthSpec(arch="qwen35", name="dense"), SynthSpec(n_layer=8, write_recurrent_array=True),
                 SynthSpec(arch="qwen3next", name="next"), SynthSpec(mtp=True)):
        path = write_synthetic_gguf(tmp_path / f"{spec.arch}-{spec.name}.gguf", spec)[0]
        check_metadata(read_gguf(path).metadata, str(path))


def test_missing_architecture_is_left_to_the_layout_to_report() -> None:
    check_metadata({"general.name": "x"}, "f.gguf")


def test_a_metadata_refusal_names_the_file_the_key_and_the_range() -> None:
    meta = {kv.key: kv.value for kv in with_kv(KV("qwen35moe.context_length", 4, 0))}
    with pytest.raises(TunerError, match=r"^f\.gguf: GGUF key qwen35moe\.context_length is 0, expected a whole "
                                         r"number 1\.\.1073741824$"):
        check_metadata(meta, "f.gguf")


# --- Hub answers, in-process ----------------------------------------------------------------------------------------

@pytest.fixture
def hostile_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    root = tmp_path / "hub"
    for name in ("abs", "dots", "fine"):
        write_synthetic_gguf(root / "acme" / name / "Tiny-Q4_K_M.gguf", SynthSpec(fill="zeros"))
    outside = tmp_path / "outside"
    with FakeHub(root, misbehave={"acme/abs": Misbehave(listing_patch={"sha": str(outside / "evil")}),
                                  "acme/dots": Misbehave(listing_patch={"sha": "../../../../x"})}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "cache"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(remote, "hub_token", lambda: None)
        yield hub


@pytest.mark.parametrize(("repo", "value"), [("acme/abs", "/"), ("acme/dots", "'../../../../x'")])
def test_a_hub_sha_that_is_a_path_is_refused_before_anything_is_written(hostile_hub: FakeHub, tmp_path: Path,
                                                                        repo: str, value: str) -> None:
    with pytest.raises(TunerError, match="is not a commit id") as err:
        remote.hub_candidates(f"{repo}:Q4_K_M")
    assert value in str(err.value)
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(tmp_path / "hub")]
    assert written == []


def test_a_tampered_cached_listing_is_not_used(hostile_hub: FakeHub, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    listing = remote.list_hub_repo("acme/fine")
    cached = tmp_path / "cache" / "hub-headers" / "acme" / "fine" / f"{listing.commit}.listing.json"
    data = json.loads(cached.read_text())
    data["files"].append(["../../../../escape.gguf", 10])
    cached.write_text(json.dumps(data))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TunerError, match="never listed before"):
        remote.list_hub_repo("acme/fine")


def test_offline_mode_reads_the_cached_listing_without_asking_the_hub(hostile_hub: FakeHub,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    online = remote.list_hub_repo("acme/fine")
    hostile_hub.reset_counters()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = remote.list_hub_repo("acme/fine")
    assert offline.from_cache and offline.files == online.files and hostile_hub.requests == []


@pytest.mark.parametrize("text", ["0", "-3", "nan", "inf", "soon"])
def test_the_hub_deadline_must_be_a_positive_number(text: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(hub_api.DEADLINE_ENV, text)
    with pytest.raises(TunerError, match="must be a positive number of seconds"):
        hub_api.deadline_s()
    monkeypatch.setenv(hub_api.DEADLINE_ENV, "12.5")
    assert hub_api.deadline_s() == 12.5


def test_cached_headers_past_the_parser_bounds_are_not_used(tmp_path: Path) -> None:
    from tuner.gguf_file import HEADER_CACHE_FORMAT, MAX_TENSORS, read_gguf, shard_from_dict, shard_to_dict

    path = write_synthetic_gguf(tmp_path / "m.gguf", SynthSpec(fill="zeros"))[0]
    header_ = read_gguf(path, use_cache=False)
    good = shard_to_dict(parse_header(path.read_bytes()[:header_.header_bytes]), header_.file_bytes)
    assert shard_from_dict(good, 0) is not None
    for bad in ({**good, "format": HEADER_CACHE_FORMAT - 1},  # written before the bounds existed
                {**good, "tensors": good["tensors"] * (MAX_TENSORS // len(good["tensors"]) + 1)},
                {**good, "data_offset": MAX_HEADER_BYTES + 1},
                {**good, "metadata": {f"k{i}": 1 for i in range(20_000)}}):
        assert shard_from_dict(bad, 0) is None
    parsed = shard_from_dict(good, 0)
    assert parsed is not None and parsed[0] == parse_header(path.read_bytes()[:header_.header_bytes])


@pytest.mark.parametrize("patch", [
    {"data_offset": 1e300}, {"data_offset": "64"}, {"data_offset": True}, {"size": -1}, {"version": 7},
    {"metadata": {"a.b": {"array": -1}}}, {"metadata": {"a.b": [[1]]}}, {"metadata": {"a.b": None}},
    {"tensors": [["w", [32], 0]]}, {"tensors": [["w", [32.0], 0, 0]]}, {"tensors": [["w", [32], 4242, 0]]},
    {"tensors": [["w", [1 << 62, 4], 0, 0]]}, {"tensors": [["w", [32], 0, 0], ["w", [32], 0, 0]]},
])
def test_a_cached_header_with_a_value_the_parser_would_not_give_is_a_miss(patch: dict[str, object],
                                                                          tmp_path: Path) -> None:
    from tuner.gguf_file import read_gguf, shard_from_dict, shard_to_dict

    path = write_synthetic_gguf(tmp_path / "m.gguf", SynthSpec(fill="zeros"))[0]
    good = shard_to_dict(parse_header(path.read_bytes()[:read_gguf(path).header_bytes]), path.stat().st_size)
    assert shard_from_dict(good, 0) is not None
    assert shard_from_dict({**good, **patch}, 0) is None


def test_a_cached_header_holding_1e400_is_refused_where_its_json_is_parsed() -> None:
    from tuner.records import RecordError, parse_json

    with pytest.raises(RecordError, match=r"the number 1e400 is out of range"):
        parse_json('{"format": 3, "data_offset": 1e400}')

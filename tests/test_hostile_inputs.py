"""Hostile inputs, through the real CLI: GGUF headers, shard names and Hub answers built to break tuner.

Every case runs ``python -m tuner`` in a subprocess under a memory limit (RLIMIT_AS) and a timeout, with HOME, the
cache and the config pointed into the case's own folder, and checks what issue 9 asks of each: exactly one stderr
line that says what is wrong (never "internal error"), a non-zero exit, nothing written outside tuner's folders, and
no process left behind. Local files go through ``tuner estimate FILE``; Hub answers through ``tuner recommend
acme/<case>:Q4_K_M`` against the loopback Hub (tests/hubserver.py), each case a repo that misbehaves its own way.
"""

from __future__ import annotations

import os
import re
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from ggufbytes import (
    ARR,
    BASE_KVS,
    BOOL,
    F32,
    I32,
    KV,
    STR,
    U8,
    U32,
    array,
    gstr,
    header,
    tensor_info,
    with_kv,
    write,
    write_sparse,
)
from hostile import CASE_TIMEOUT_S, case_env, limit_memory, run_tuner, snapshot
from hubserver import LADDER_SPEC, FakeHub, Misbehave

from tuner.gguf_file import MAX_HEADER_BYTES
from tuner.synth import write_synthetic_gguf

SHORT_DEADLINE_S = "1.5"
N_MAX = (1 << 22) - 1  # just under MAX_ARRAY: the largest array the parser accepts, to build oversized headers


# --- the cases ----------------------------------------------------------------------------------------------------

GgufBuilder = Callable[[Path], object]


@dataclass(frozen=True)
class Case:
    """One hostile input and the one line tuner must answer it with (``expect``: a regex searched in that line)."""

    id: str
    expect: str
    gguf: GgufBuilder | None = None  # writes a local file: the case runs ``tuner estimate`` on it
    file_name: str = "model.gguf"
    hub: Misbehave | None = None  # the case's repo misbehaves so: ``tuner recommend acme/<id>:Q4_K_M``
    hub_files: GgufBuilder | None = None  # writes the repo's files (default: one valid tiny Q4_K_M)
    argv: tuple[str, ...] = ()  # instead of the above: these arguments ({repo} = the case's repo)
    env: dict[str, str] = field(default_factory=dict)
    max_range_end: int | None = None  # no Range request may end past this byte


def _bytes(data: bytes, *, size: int | None = None) -> GgufBuilder:
    return lambda path: write(path, data, size=size)


def _kv(*changes: KV) -> GgufBuilder:
    return _bytes(header(with_kv(*changes)))


def _extra(*extra: KV | bytes, n_kv: int | None = None) -> GgufBuilder:
    return _bytes(header([*BASE_KVS, *extra], n_kv=n_kv))


def _arr(key: str, etype: int, items: list[object] | None = None, *, claimed: int | None = None) -> KV:
    return KV(key, ARR, raw=array(etype, items or [], claimed=claimed))


def _nested(depth: int) -> bytes:
    """An array of arrays ``depth`` deep (the innermost empty)."""
    return struct.pack("<IQ", ARR, 1) * (depth - 1) + struct.pack("<IQ", U8, 0)


def _oversized_header(etype: int) -> GgufBuilder:
    """A header past MAX_HEADER_BYTES made of arrays under every per-array limit: 4M-element u8 arrays, or arrays of
    4M empty strings (8 bytes each), their bytes a sparse hole."""
    per = N_MAX * (1 if etype == U8 else 8)
    n = MAX_HEADER_BYTES // per + 2

    def build(path: Path) -> None:
        parts: list[bytes | int] = [header(BASE_KVS, n_kv=len(BASE_KVS) + n, pad=False)]
        for i in range(n):
            parts += [gstr(f"a.k{i}") + struct.pack("<I", ARR) + array(etype, [], claimed=N_MAX), per]
        write_sparse(path, parts, size=per * (n + 1))

    return build


def _tensor(*infos: bytes, n_tensors: int | None = None) -> GgufBuilder:
    return _bytes(header(BASE_KVS, infos, n_tensors=n_tensors))


def _split(names: tuple[str, ...], first: str, *, split_count: KV | None = None) -> GgufBuilder:
    """Shards ``names`` beside the case's file (each a valid header, optionally with a split.count)."""
    def build(path: Path) -> None:
        kvs = list(BASE_KVS) + ([split_count] if split_count else [])
        for name in names:
            write(path.parent / name, header(kvs))
    return build


def _tiny_model(path: Path) -> None:
    write_synthetic_gguf(path, replace(LADDER_SPEC, fill="zeros"))


def _hub_gguf(data: bytes, *, size: int | None = None) -> GgufBuilder:
    return lambda repo: write(repo / "Tiny-Q4_K_M.gguf", data, size=size)


BIG = (1 << 40) - 1
B = BASE_KVS
LOCAL_CASES = [
    # structure: counts, lengths, nesting, types
    Case("u8-array-claims-2-pow-40", r"GGUF key 'x\.arr': an array of 1099511627775 elements, more than the limit of "
         r"4194304", _bytes(header([*B, _arr("x.arr", U8, claimed=BIG)]), size=3 << 30)),
    Case("string-claims-2-pow-40", r"GGUF key 'x\.s': a string of 1099511627776 bytes, more than the limit",
         _extra(KV("x.s", STR, raw=gstr(b"", claimed=1 << 40)))),
    Case("keys-claim-2-pow-40", r"GGUF the header: 1099511627776 metadata keys, more than the limit of 16384",
         _bytes(header(B, n_kv=1 << 40))),
    Case("tensors-claim-2-pow-40", r"GGUF the header: 1099511627776 tensors, more than the limit of 65536",
         _bytes(header(B, n_tensors=1 << 40))),
    Case("string-in-array-claims-2-pow-63", r"GGUF key 'x\.v': the header would be larger than the limit",
         _bytes(header([*B, KV("x.v", ARR, raw=struct.pack("<IQ", STR, 5000) + struct.pack("<QQ", 1 << 63, 0))]))),
    Case("nested-array", r"GGUF key 'x\.nest': an array of arrays", _extra(KV("x.nest", ARR, raw=_nested(2)))),
    Case("arrays-nested-5000-deep", r"GGUF key 'x\.deep': an array of arrays",
         _extra(KV("x.deep", ARR, raw=_nested(5000)))),
    Case("duplicate-key", r"GGUF key 'qwen35moe\.block_count': the key appears twice",
         _extra(KV("qwen35moe.block_count", U32, 4))),
    Case("empty-key", r"GGUF key '': an empty key name", _extra(KV("", U32, 1))),
    Case("key-of-70000-bytes", r"GGUF key #9: a string of 70000 bytes, more than the limit of 65535",
         _extra(KV("k" * 70000, U32, 1))),
    Case("unknown-value-type", r"GGUF key 'x\.t': unknown value type 99", _extra(KV("x.t", 99, raw=b"\0" * 8))),
    Case("unknown-array-type", r"GGUF key 'x\.t': unknown array element type 77",
         _extra(_arr("x.t", 77, claimed=3))),
    Case("alignment-not-power-of-2", r"key 'general\.alignment'.*48 is not a power of 2",
         _extra(KV("general.alignment", U32, 48))),
    Case("alignment-a-string", r"key 'general\.alignment'.*'32' is not a power of 2",
         _extra(KV("general.alignment", STR, "32"))),
    Case("tensor-with-5-dims", r"GGUF tensor 'w': 5 dimensions, more than ggml's 4",
         _tensor(tensor_info("w", [1, 1, 1, 1, 1]))),
    Case("tensor-name-of-100-bytes", r"GGUF tensor #0: a string of 100 bytes, more than the limit of 63",
         _tensor(tensor_info("t" * 100, [32]))),
    Case("duplicate-tensor-name", r"GGUF tensor 'w': the tensor name appears twice",
         _tensor(tensor_info("w", [32]), tensor_info("w", [32]))),
    Case("tensor-shape-overflows", r"GGUF tensor 'w': shape \[4611686018427387904, 4\] overflows",
         _tensor(tensor_info("w", [1 << 62, 4]))),
    Case("unknown-ggml-type", r"tensor 'w' has unknown ggml type 4242", _tensor(tensor_info("w", [32], 4242))),
    Case("header-over-64MiB-of-u8-arrays", r"the header would be larger than the limit of 67108864 bytes",
         _oversized_header(U8)),
    Case("header-over-64MiB-of-strings", r"the header would be larger than the limit of 67108864 bytes",
         _oversized_header(STR)),
    Case("not-gguf", r"is not a GGUF file \(magic b'GGML'", _bytes(header(B, magic=b"GGML"))),
    Case("gguf-version-7", r"unsupported GGUF version 7", _bytes(header(B, version=7))),
    Case("header-cut-short", r"is truncated: the header ends at byte 100", _bytes(header(B)[:100])),
    Case("tensor-data-missing", r"is truncated: tensor data needs \d+ bytes",
         _tensor(tensor_info("w", [1024, 1024]))),
    # metadata types and ranges (tuner.gguf_schema)
    Case("block_count-a-string", r"GGUF key qwen35moe\.block_count is the string '4', expected a whole number 1\.\.512",
         _kv(KV("qwen35moe.block_count", STR, "4"))),
    Case("block_count-an-array", r"qwen35moe\.block_count is an array of 2 entries, expected a whole number",
         _kv(_arr("qwen35moe.block_count", U32, [4, 4]))),
    Case("block_count-30-million", r"qwen35moe\.block_count is 30000000, expected a whole number 1\.\.512",
         _kv(KV("qwen35moe.block_count", U32, 30_000_000))),
    Case("block_count-zero", r"qwen35moe\.block_count is 0, expected", _kv(KV("qwen35moe.block_count", U32, 0))),
    Case("block_count-a-bool", r"qwen35moe\.block_count is True, expected", _kv(KV("qwen35moe.block_count", BOOL, 1))),
    Case("head_count_kv-strings", r"qwen35moe\.attention\.head_count_kv is an array of 4 entries, expected whole "
         r"numbers 0\.\.65536 \(found '2'\)", _kv(_arr("qwen35moe.attention.head_count_kv", STR, ["2"] * 4))),
    Case("nextn_predict_layers-negative", r"qwen35moe\.nextn_predict_layers is -1, expected a whole number 0\.\.511",
         _kv(KV("qwen35moe.nextn_predict_layers", I32, -1))),
    Case("nextn_predict_layers-all-blocks", r"nextn_predict_layers is 4, expected fewer than the 4 blocks",
         _kv(KV("qwen35moe.nextn_predict_layers", U32, 4))),
    Case("per-layer-array-of-5000", r"qwen35moe\.attention\.head_count has 5000 entries for 4 layers",
         _kv(_arr("qwen35moe.attention.head_count", U32, [4] * 5000))),
    Case("context_length-zero", r"qwen35moe\.context_length is 0, expected a whole number 1\.\.",
         _kv(KV("qwen35moe.context_length", U32, 0))),
    Case("embedding_length-a-float", r"qwen35moe\.embedding_length is 256\.0, expected",
         _kv(KV("qwen35moe.embedding_length", F32, 256.0))),
    Case("expert_used_count-over-expert_count", r"expert_used_count is 9, expected at most the 8 experts",
         _kv(KV("qwen35moe.expert_used_count", U32, 9))),
    Case("recurrent_layers-strings", r"recurrent_layers is an array of 4 entries, expected an array of one boolean",
         _kv(_arr("qwen35moe.attention.recurrent_layers", STR, ["yes"] * 4))),
    Case("architecture-an-array", r"general\.architecture is an array of 1 entries, expected a short name",
         _kv(_arr("general.architecture", STR, ["qwen35moe"]))),
    Case("name-of-5000-characters", r"general\.name is the string 'xxx.*, expected a string of at most 1024",
         _kv(KV("general.name", STR, "x" * 5000))),
    # split models
    Case("shard-of-zero", r"'.*-00001-of-00000\.gguf' is no split model file: shard 1 of 0",
         _bytes(header(B)), file_name="m-00001-of-00000.gguf"),
    Case("shard-of-99999", r"shard 1 of 99999 \(a split has 1 to 1024 files", _bytes(header(B)),
         file_name="m-00001-of-99999.gguf"),
    Case("shard-3-of-2", r"shard 3 of 2", _bytes(header(B)), file_name="m-00003-of-00002.gguf"),
    Case("second-shard-given", r"is shard 2 of 3: give the first shard", _bytes(header(B)),
         file_name="m-00002-of-00003.gguf"),
    Case("split-shards-missing", r"split model is missing 2 of 3 shards: m-00002-of-00003\.gguf",
         _bytes(header(B)), file_name="m-00001-of-00003.gguf"),
    Case("split-count-a-string", r"GGUF key 'split\.count' is 'two', expected a whole number",
         _split(("m-00001-of-00002.gguf", "m-00002-of-00002.gguf"), "m-00001-of-00002.gguf",
                split_count=KV("split.count", STR, "two")), file_name="m-00001-of-00002.gguf"),
    Case("split-count-disagrees", r"says it is split into 5 files, found 2",
         _split(("m-00001-of-00002.gguf", "m-00002-of-00002.gguf"), "m-00001-of-00002.gguf",
                split_count=KV("split.count", U32, 5)), file_name="m-00001-of-00002.gguf"),
]

HUB_CASES = [
    # item 1: the two path escapes of issue 9, and other names that must never become paths
    Case("sha-absolute", r"the Hub's commit: '/.+ is not a commit id",
         hub=Misbehave(listing_patch={"sha": "{outside}/evil"})),
    Case("sha-dot-dot", r"the Hub's commit: '\.\./\.\./\.\./\.\./x' is not a commit id",
         hub=Misbehave(listing_patch={"sha": "../../../../x"})),
    Case("sha-missing", r"the Hub's commit: None is not a commit id", hub=Misbehave(listing_patch={"sha": None})),
    Case("sibling-dot-dot", r"refusing file name '\.\./\.\./evil-Q4_K_M\.gguf'",
         hub=Misbehave(listing_patch={"siblings": [{"rfilename": "../../evil-Q4_K_M.gguf", "size": 10}]})),
    Case("sibling-absolute", r"refusing file name '/tmp/evil-Q4_K_M\.gguf'",
         hub=Misbehave(listing_patch={"siblings": [{"rfilename": "/tmp/evil-Q4_K_M.gguf", "size": 10}]})),
    Case("sibling-escape-sequence", r"refusing file name '\\x1b\[31mred-Q4_K_M\.gguf' \(control character",
         hub=Misbehave(listing_patch={"siblings": [{"rfilename": "\x1b[31mred-Q4_K_M.gguf", "size": 10}]})),
    Case("sibling-size-negative", r"file 'a-Q4_K_M\.gguf' has size -5, not 0\.\.",
         hub=Misbehave(listing_patch={"siblings": [{"rfilename": "a-Q4_K_M.gguf", "size": -5}]})),
    Case("sibling-size-a-string", r"file 'a-Q4_K_M\.gguf' has size '5'",
         hub=Misbehave(listing_patch={"siblings": [{"rfilename": "a-Q4_K_M.gguf", "size": "5"}]})),
    Case("sibling-twice", r"file 'a-Q4_K_M\.gguf' is listed twice",
         hub=Misbehave(listing_patch={"siblings": [{"rfilename": "a-Q4_K_M.gguf", "size": 5}] * 2})),
    Case("sibling-shard-of-zero", r"'a-Q4_K_M-00001-of-00000\.gguf' is no split model file",
         hub=Misbehave(listing_patch={"siblings": [{"rfilename": "a-Q4_K_M-00001-of-00000.gguf", "size": 5}]})),
    Case("sibling-a-string", r"a sibling is 'x', not an object", hub=Misbehave(listing_patch={"siblings": ["x"]})),
    Case("siblings-a-string", r"the Hub's 'siblings' is 'all of them', not a list",
         hub=Misbehave(listing_patch={"siblings": "all of them"})),
    Case("siblings-an-object", r"the Hub's 'siblings' is \{\}, not a list",
         hub=Misbehave(listing_patch={"siblings": {}})),
    Case("siblings-10001", r"10001 files, more than the limit of 10000",
         hub=Misbehave(listing_patch={"siblings": [{"rfilename": f"f{i}.txt", "size": 1} for i in range(10001)]})),
    Case("repo-id-owner-dot", r"invalid Hugging Face repo id 'owner/\.'",
         argv=("recommend", "owner/.", "--gpu", "none")),
    Case("revision-dot-dot", r"invalid revision '\.\.'",
         argv=("recommend", "acme/whatever@..:Q4_K_M", "--gpu", "none")),
    # answers that are not listings
    Case("listing-html", r"the Hub's answer listing acme/listing-html is not JSON \(text/html",
         hub=Misbehave(listing_body=b"<html><body>Welcome to the captive portal</body></html>",
                       listing_type="text/html")),
    Case("listing-a-json-list", r"the Hub answered list, not a repo listing", hub=Misbehave(listing_body=b"[1, 2]")),
    Case("listing-nested-100000-deep", r"is not JSON", hub=Misbehave(listing_body=b"[" * 100_000 + b"]" * 100_000)),
    Case("listing-endless", r"listing acme/listing-endless: the answer is more than the limit of 16777216 bytes",
         hub=Misbehave(endless_listing=True)),
    Case("listing-redirect-loop", r"the Hub redirected more than 5 times", hub=Misbehave(redirect_loop=True)),
    Case("listing-http-500", r"the Hub answered HTTP 500 listing acme/listing-http-500",
         hub=Misbehave(listing_body=b"oops", listing_status=500, listing_type="text/plain")),
    Case("listing-gated", r"acme/listing-gated is gated: accept its terms",
         hub=Misbehave(listing_body=b"{}", listing_status=403, listing_headers={"X-Error-Code": "GatedRepo"})),
    # the environment
    Case("hf-token-not-ascii", r"token .* holds characters other than printable ASCII",
         argv=("recommend", "{repo}", "--gpu", "none"), env={"HF_TOKEN": "hf_caf\u00e9"}),
    Case("hf-endpoint-ftp", r"HF_ENDPOINT must be an http:// or https:// URL, got 'ftp://example\.invalid'",
         argv=("recommend", "{repo}", "--gpu", "none"), env={"HF_ENDPOINT": "ftp://example.invalid"}),
    Case("deadline-not-a-number", r"TUNER_HUB_DEADLINE_S must be a positive number of seconds, got 'soon'",
         argv=("recommend", "{repo}", "--gpu", "none"), env={"TUNER_HUB_DEADLINE_S": "soon"}),
    # item 3: deadlines
    Case("listing-trickled", r"cannot reach .* to list acme/listing-trickled \(listing .* took longer than 1\.5 s",
         hub=Misbehave(slow="listing"), env={"TUNER_HUB_DEADLINE_S": SHORT_DEADLINE_S}),
    Case("listing-stalled", r"cannot reach .* to list acme/listing-stalled \(listing .* took longer than 1\.5 s",
         hub=Misbehave(stall="listing"), env={"TUNER_HUB_DEADLINE_S": SHORT_DEADLINE_S}),
    Case("header-trickled", r"reading GGUF headers of acme/header-trickled .* took longer than 1\.5 s",
         hub=Misbehave(slow="files"), env={"TUNER_HUB_DEADLINE_S": SHORT_DEADLINE_S}),
    Case("header-stalled", r"reading GGUF headers of acme/header-stalled .* took longer than 1\.5 s",
         hub=Misbehave(stall="files"), env={"TUNER_HUB_DEADLINE_S": SHORT_DEADLINE_S}),
    # item 2 over HTTP: the header's claims never decide what is requested
    Case("hub-u8-array-claims-2-pow-40", r"GGUF key 'x\.arr': an array of 1099511627775 elements",
         hub=Misbehave(sizes={"Tiny-Q4_K_M.gguf": 1 << 44}),
         hub_files=_hub_gguf(header([*B, _arr("x.arr", U8, claimed=BIG)]), size=8 << 20),
         max_range_end=MAX_HEADER_BYTES),
    Case("hub-header-over-64MiB", r"the header would be larger than the limit of 67108864 bytes",
         hub=Misbehave(), hub_files=lambda repo: _oversized_header(U8)(repo / "Tiny-Q4_K_M.gguf"),
         max_range_end=MAX_HEADER_BYTES),
    Case("hub-block_count-a-string", r"Tiny-Q4_K_M\.gguf: GGUF key qwen35moe\.block_count is the string '4'",
         hub=Misbehave(), hub_files=_hub_gguf(header(with_kv(KV("qwen35moe.block_count", STR, "4"))))),
]
CASES = LOCAL_CASES + HUB_CASES
assert len({c.id for c in CASES}) == len(CASES), "case ids name repos and folders: one each"


# --- the world the cases run in ---------------------------------------------------------------------------------

@dataclass
class World:
    root: Path  # everything the cases read: local models, the Hub's repos; must not change
    models: Path
    hub: FakeHub
    outside: Path  # where an absolute sha would have tuner write


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    root = tmp_path_factory.mktemp("hostile-world")
    models, hub_root, outside = root / "models", root / "hub", root / "outside"
    outside.mkdir()
    misbehave: dict[str, Misbehave] = {}
    for case in CASES:
        if case.gguf is not None:
            case.gguf(models / case.id / case.file_name)
        if case.hub is not None or case.argv:
            repo_dir = hub_root / "acme" / case.id
            repo_dir.mkdir(parents=True)
            (case.hub_files or (lambda d: _tiny_model(d / "Tiny-Q4_K_M.gguf")))(repo_dir)
            if case.hub is not None:
                patch = {k: (v.replace("{outside}", str(outside)) if isinstance(v, str) else v)
                         for k, v in case.hub.listing_patch.items()}
                misbehave[f"acme/{case.id}"] = replace(case.hub, listing_patch=patch)
    with FakeHub(hub_root, misbehave=misbehave) as hub:
        yield World(root, models, hub, outside)


_snapshot, _limit_memory = snapshot, limit_memory


def _env(case_root: Path, endpoint: str, extra: dict[str, str]) -> dict[str, str]:
    return case_env(case_root, endpoint, extra)


def _argv(case: Case, world: World) -> list[str]:
    repo = f"acme/{case.id}"
    if case.argv:
        return [a.replace("{repo}", repo) for a in case.argv]
    if case.gguf is not None:
        return ["estimate", str(world.models / case.id / case.file_name)]
    return ["recommend", f"{repo}:Q4_K_M", "--gpu", "none"]


def _session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_one_line_and_a_failing_exit_with_nothing_written_outside(
        case: Case, world: World, tmp_path: Path, record_property: pytest.RecordProperty) -> None:
    case_root = tmp_path / "case"
    (case_root / "home").mkdir(parents=True)
    tuner_dirs = (case_root / "cache", case_root / "config")
    (case_root / "tmp").mkdir()  # TMPDIR: must stay empty
    before_case, before_world = _snapshot(case_root, tuner_dirs), _snapshot(world.root)
    world.hub.reset_counters()

    outcome = run_tuner(_argv(case, world), case_root, _env(case_root, world.hub.endpoint, case.env))

    record_property("seconds", round(outcome.seconds, 2))
    assert len(outcome.stderr_lines) == 1, outcome.stderr_lines
    line = outcome.stderr_lines[0]
    assert line.startswith("tuner: error: ") and "internal error" not in line, line
    assert re.search(case.expect, line), line
    assert outcome.returncode not in (0, 70), (outcome.returncode, line)
    assert not outcome.left_running, outcome.left_running
    assert _snapshot(case_root, tuner_dirs) == before_case  # nothing outside the cache and config dirs
    assert _snapshot(world.root) == before_world  # nor beside the models, in the Hub's files or "outside"
    if case.max_range_end is not None:
        ends = [int(m.group(1)) for r in world.hub.requests
                if (m := re.match(r"bytes=\d+-(\d+)$", r.header("Range") or ""))]
        assert ends and max(ends) < case.max_range_end



# --- Ctrl-C during a stalled Hub read -------------------------------------------------------------------------------

INTERRUPT_WITHIN_S = 2.0  # issue 9: Ctrl-C ends tuner within 2 s, whatever read is stuck


@pytest.fixture(scope="module")
def stalling_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    root = tmp_path_factory.mktemp("stalling-hub")
    for name in ("stalled-listing", "stalled-header"):
        _tiny_model(root / "acme" / name / "Tiny-Q4_K_M.gguf")
    with FakeHub(root, misbehave={"acme/stalled-listing": Misbehave(stall="listing"),
                                  "acme/stalled-header": Misbehave(stall="files")}) as hub:
        yield hub


@pytest.mark.parametrize(("repo", "stuck_at"), [("acme/stalled-listing", "/api/models/"),
                                                 ("acme/stalled-header", "/resolve/")])
def test_ctrl_c_during_a_stalled_hub_read_ends_tuner_at_once(stalling_hub: FakeHub, tmp_path: Path, repo: str,
                                                             stuck_at: str) -> None:
    (tmp_path / "home").mkdir()
    stalling_hub.reset_counters()
    proc = subprocess.Popen([sys.executable, "-m", "tuner", "recommend", repo, "--gpu", "none"], cwd=tmp_path,
                            env=_env(tmp_path, stalling_hub.endpoint, {}), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=_limit_memory,
                            start_new_session=True)
    try:
        waited = time.monotonic()
        while not any(r.path.startswith(stuck_at) or stuck_at in r.path for r in stalling_hub.requests):
            assert proc.poll() is None and time.monotonic() - waited < CASE_TIMEOUT_S, "never reached the stall"
            time.sleep(0.05)
        time.sleep(0.3)  # well inside the read the server will never answer (its timeout is 30 s)
        assert proc.poll() is None
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=INTERRUPT_WITHIN_S)
    finally:
        left = _session_alive(proc.pid)
        if proc.poll() is None or left:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130 and stderr.strip() == "tuner: interrupted", (proc.returncode, stderr)
    assert not left  # no child, no process of its session outlived it


# --- names from files print as text -------------------------------------------------------------------------------

HOSTILE_NAME = "[/bold]x [red]red[/red] \x1b[31mESC\x1b[0m \u202eevil"


@pytest.fixture(scope="module")
def hostile_name_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("names") / "[/bold]x-Q8_0.gguf"
    write_synthetic_gguf(path, replace(LADDER_SPEC, fill="zeros", name=HOSTILE_NAME))
    return path


@pytest.mark.parametrize("command", ["estimate", "recommend"])
def test_model_names_with_markup_and_escape_sequences_print_as_text(hostile_name_gguf: Path, tmp_path: Path,
                                                                    command: str) -> None:
    (tmp_path / "home").mkdir()
    proc = subprocess.run([sys.executable, "-m", "tuner", command, str(hostile_name_gguf), "--gpu", "none"],
                          cwd=tmp_path, env=_env(tmp_path, "http://127.0.0.1:9", {}), capture_output=True, text=True,
                          timeout=CASE_TIMEOUT_S, preexec_fn=_limit_memory)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    out = proc.stdout
    assert "\x1b" not in out and "\u202e" not in out  # nothing raw reaches the terminal
    assert "[/bold]x" in out  # the file name, as written
    if command == "recommend":
        assert "[/bold]x [red]red[/red] \\x1b[31mESC\\x1b[0m \\u202eevil" in out  # the model's name, as text

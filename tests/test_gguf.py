"""Reading GGUF headers: metadata, the tensor table, split models, prefix-only reads, and every way a file can be bad.

The files are real GGUFs written by the ``gguf`` package (through :mod:`tuner.synth`); gguf-py's own reader is the
reference the tensor table is checked against.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from tuner import gguf_file
from tuner.errors import TunerError
from tuner.ggml import GGML_TYPES, KV_CACHE_TYPES, kv_cache_type, row_bytes
from tuner.gguf_file import ArraySummary, NeedMoreBytes, parse_growing, parse_header, read_gguf
from tuner.models import resolve_layout
from tuner.synth import SynthSpec, qwen35_35b_a3b_spec, tensor_plan, vocabulary, write_synthetic_gguf

REAL_VOCAB = 248_320


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_synthetic_gguf(path, SynthSpec(mtp=True))
    return path


@pytest.fixture(scope="module")
def sparse_35b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real 35B-A3B shapes and vocabulary, all weights zero: ~65 GB long, a few MB on disk."""
    path = tmp_path_factory.mktemp("gguf") / "sparse-35b.gguf"
    spec = qwen35_35b_a3b_spec(extra_vocab=REAL_VOCAB - len(vocabulary(SynthSpec())[0]))
    write_synthetic_gguf(path, spec)
    return path


def one_line_error(exc: pytest.ExceptionInfo[TunerError]) -> str:
    message = exc.value.one_line()
    assert "\n" not in message
    assert message == str(exc.value).strip()
    return message


# ------------------------------------------------------------------------------------------------ the happy path


def test_metadata_reads_back_what_the_writer_wrote(tiny: Path) -> None:
    header = read_gguf(tiny)
    spec = SynthSpec(mtp=True)
    assert header.version == 3
    assert header.arch == "qwen35moe"
    assert header.get("qwen35moe.block_count") == spec.n_layer + 1
    assert header.get("qwen35moe.embedding_length") == spec.n_embd
    assert header.get("qwen35moe.nextn_predict_layers") == 1
    assert header.get("qwen35moe.rope.freq_base") == pytest.approx(1e7)
    assert header.get("tokenizer.ggml.model") == "gpt2"
    assert header.get("tokenizer.chat_template", "").startswith("{% for message in messages %}")
    tokens = header.get("tokenizer.ggml.tokens")
    assert len(tokens) == len(vocabulary(spec)[0])
    assert header.get("general.name") == spec.name


def test_ggml_type_table_matches_gguf_py() -> None:
    """tuner.ggml writes the table out (no numpy import on the header path): every id, name and block size must be
    gguf-py's, and every type gguf-py knows must be in it."""
    for t in GGML_TYPES.values():
        q = gguf.GGMLQuantizationType[t.name.upper()]
        assert q.value == t.type_id
        assert gguf.GGML_QUANT_SIZES[q] == (t.block_size, t.type_bytes), t.name
    assert {q.value for q in gguf.GGMLQuantizationType} <= set(GGML_TYPES)


def test_kv_cache_types_are_llama_cpp_s_list_with_their_block_sizes() -> None:
    assert KV_CACHE_TYPES == ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")
    per_512 = {name: row_bytes(kv_cache_type(name), 512) for name in KV_CACHE_TYPES}
    assert per_512 == {"f32": 2048, "f16": 1024, "bf16": 1024, "q8_0": 544, "q4_0": 288, "q4_1": 320,
                       "iq4_nl": 288, "q5_0": 352, "q5_1": 384}
    with pytest.raises(TunerError, match="unknown cache type 'q4_K'"):
        kv_cache_type("q4_K")


def test_tensor_table_matches_gguf_py_reader(tiny: Path) -> None:
    header = read_gguf(tiny)
    ours = {t.name: t for t in header.tensors}
    reference = gguf.GGUFReader(tiny)
    assert set(ours) == {t.name for t in reference.tensors}
    for ref in reference.tensors:
        t = ours[ref.name]
        assert t.shape == tuple(int(d) for d in ref.shape)
        assert t.ggml_type.type_id == int(ref.tensor_type)
        assert t.nbytes == int(ref.n_bytes)
        assert t.n_elements == int(ref.n_elements)
        assert header.header_bytes + t.offset == int(ref.data_offset)


def test_tensor_table_holds_every_planned_tensor_in_ggml_order(tiny: Path) -> None:
    spec = SynthSpec(mtp=True)
    plan = tensor_plan(spec, len(vocabulary(spec)[0]))
    header = read_gguf(tiny)
    assert [(t.name, t.shape) for t in header.tensors] == [(name, shape) for name, shape, _ in plan]
    assert header.tensor_bytes + header.header_bytes <= header.file_bytes == tiny.stat().st_size


def test_long_arrays_are_counted_not_decoded(sparse_35b: Path) -> None:
    header = read_gguf(sparse_35b, use_cache=False)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type"):  # strings and int32s
        value = header.get(key)
        assert isinstance(value, ArraySummary) and len(value) == REAL_VOCAB, key
    assert isinstance(header.get("qwen35moe.rope.dimension_sections"), list)  # short arrays are decoded


def test_split_model_joins_all_shards_and_sums_their_sizes(tmp_path: Path, tiny: Path) -> None:
    shards = write_synthetic_gguf(tmp_path / "split.gguf", SynthSpec(mtp=True), split_max_tensors=20)
    assert len(shards) >= 3
    assert shards[0].name.endswith(f"-00001-of-{len(shards):05d}.gguf")
    header = read_gguf(shards[0])
    assert header.paths == tuple(str(p) for p in shards)
    assert header.file_bytes == sum(p.stat().st_size for p in shards)
    whole = read_gguf(tiny)
    assert [(t.name, t.shape, t.nbytes) for t in header.tensors] == [(t.name, t.shape, t.nbytes) for t in whole.tensors]
    assert {t.shard for t in header.tensors} == set(range(len(shards)))
    assert header.tensor_bytes == whole.tensor_bytes


def test_a_later_shard_is_refused_with_the_first_shard_named(tmp_path: Path) -> None:
    shards = write_synthetic_gguf(tmp_path / "split.gguf", SynthSpec(), split_max_tensors=20)
    with pytest.raises(TunerError) as exc:
        read_gguf(shards[1])
    assert "give the first shard" in one_line_error(exc)


class _CountingFile:
    """Wraps a binary file and counts the bytes read through it."""

    def __init__(self, fh: Any, counter: list[int]) -> None:
        self._fh, self._counter = fh, counter

    def read(self, n: int = -1) -> bytes:
        data = self._fh.read(n)
        self._counter.append(len(data))
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._fh, name)

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._fh.close()


def test_read_gguf_reads_only_a_prefix_of_a_20_gb_class_file(sparse_35b: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    size = sparse_35b.stat().st_size
    assert size > 20 * 10**9
    reads: list[int] = []
    real_open = open

    def counting_open(*args: Any, **kwargs: Any) -> _CountingFile:
        return _CountingFile(real_open(*args, **kwargs), reads)

    monkeypatch.setattr(gguf_file, "open", counting_open, raising=False)
    header = read_gguf(sparse_35b, use_cache=False)
    assert reads, "the reader did not go through open()"
    assert sum(reads) <= gguf_file.LOCAL_FIRST_READ
    assert sum(reads) < size / 1000
    assert len(header.tensors) == 733
    assert header.header_bytes < sum(reads)  # the whole header was in the prefix that was read


def test_parse_header_asks_for_more_bytes_until_the_header_is_complete(tiny: Path) -> None:
    data = tiny.read_bytes()
    full = parse_header(data)
    with pytest.raises(NeedMoreBytes) as more:
        parse_header(data[:100])
    assert more.value.needed > 100
    asked: list[int] = []

    def read_prefix(n: int) -> bytes:
        asked.append(n)
        return data[:n]

    grown = parse_growing(read_prefix, len(data), shard=0, source="tiny", first_read=64)
    assert grown == full
    assert asked[0] == 64 and len(asked) > 1
    assert asked == sorted(asked)
    with pytest.raises(NeedMoreBytes):  # every prefix but the last was too short
        parse_header(data[: asked[-2]])


# ------------------------------------------------------------------------------------------------ bad input


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(TunerError) as exc:
        read_gguf(tmp_path / "nope.gguf")
    assert one_line_error(exc).startswith("no such file")


def test_a_directory_is_not_a_gguf_file(tmp_path: Path) -> None:
    with pytest.raises(TunerError) as exc:
        read_gguf(tmp_path)
    assert "is a directory" in one_line_error(exc)


def test_empty_file_is_a_clear_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.gguf"
    empty.touch()
    with pytest.raises(TunerError) as exc:
        read_gguf(empty)
    assert "is empty" in one_line_error(exc)


def test_random_bytes_are_not_a_gguf_file(tmp_path: Path) -> None:
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(os.urandom(4096))
    with pytest.raises(TunerError) as exc:
        read_gguf(junk)
    assert "is not a GGUF file" in one_line_error(exc)


def test_wrong_magic_names_what_was_found(tmp_path: Path, tiny: Path) -> None:
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGML" + tiny.read_bytes()[4:])
    with pytest.raises(TunerError) as exc:
        read_gguf(bad)
    assert "b'GGML'" in one_line_error(exc)


def test_unsupported_version_is_named(tmp_path: Path, tiny: Path) -> None:
    data = bytearray(tiny.read_bytes())
    data[4:8] = struct.pack("<I", 7)
    bad = tmp_path / "v7.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(TunerError) as exc:
        read_gguf(bad)
    assert "unsupported GGUF version 7" in one_line_error(exc)


def test_truncated_header_is_a_clear_error(tmp_path: Path, tiny: Path) -> None:
    header_bytes = read_gguf(tiny).header_bytes
    cut = tmp_path / "cut-header.gguf"
    cut.write_bytes(tiny.read_bytes()[: header_bytes // 2])
    with pytest.raises(TunerError) as exc:
        read_gguf(cut)
    message = one_line_error(exc)
    assert "truncated" in message and "header" in message


def test_truncated_tensor_data_is_a_clear_error(tmp_path: Path, tiny: Path) -> None:
    data = tiny.read_bytes()
    cut = tmp_path / "cut-data.gguf"
    cut.write_bytes(data[: len(data) - 1000])
    with pytest.raises(TunerError) as exc:
        read_gguf(cut)
    message = one_line_error(exc)
    assert "truncated" in message and "1000 bytes missing" in message


def test_an_unreadable_file_is_a_clear_error(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def denied(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(gguf_file, "open", denied, raising=False)  # chmod 000 means nothing to root
    with pytest.raises(TunerError) as exc:
        read_gguf(tiny, use_cache=False)
    assert one_line_error(exc) == f"cannot read {tiny}: Permission denied"


def test_missing_shard_is_a_clear_error(tmp_path: Path) -> None:
    shards = write_synthetic_gguf(tmp_path / "split.gguf", SynthSpec(), split_max_tensors=20)
    shards[-1].unlink()
    with pytest.raises(TunerError) as exc:
        read_gguf(shards[0])
    message = one_line_error(exc)
    assert "missing 1 of" in message and shards[-1].name in message


def test_a_renamed_shard_is_refused_by_its_split_metadata(tmp_path: Path) -> None:
    shards = write_synthetic_gguf(tmp_path / "split.gguf", SynthSpec(), split_max_tensors=20)
    alone = tmp_path / "alone.gguf"
    alone.write_bytes(shards[0].read_bytes())
    with pytest.raises(TunerError) as exc:
        read_gguf(alone)
    assert f"says it is split into {len(shards)} files, found 1" in one_line_error(exc)


def test_unknown_architecture_is_refused_when_building_the_layout(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_uint32("mamba.block_count", 2)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert read_gguf(path).arch == "mamba"  # the header itself is fine
    with pytest.raises(TunerError) as exc:
        resolve_layout(str(path))
    assert "unsupported architecture 'mamba'" in one_line_error(exc)


# ------------------------------------------------------------------------------------------------ the header cache


def test_unchanged_file_is_read_from_the_header_cache_without_parsing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "cache"))
    model = write_synthetic_gguf(tmp_path / "m.gguf", SynthSpec(extra_vocab=5000))[0]
    first = read_gguf(model)
    assert len(list((tmp_path / "cache" / "gguf-headers").iterdir())) == 1

    def no_parse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an unchanged file was parsed again")

    monkeypatch.setattr(gguf_file, "parse_growing", no_parse)
    again = read_gguf(model)
    assert again.metadata == first.metadata and again.tensors == first.tensors
    assert again.file_bytes == first.file_bytes and again.header_bytes == first.header_bytes
    assert isinstance(again.metadata["tokenizer.ggml.tokens"], ArraySummary)


def test_changed_or_truncated_file_is_parsed_again_not_taken_from_the_cache(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "cache"))
    model = write_synthetic_gguf(tmp_path / "m.gguf", SynthSpec(n_layer=4))[0]
    assert read_gguf(model).metadata["qwen35moe.block_count"] == 4
    write_synthetic_gguf(model, SynthSpec(n_layer=8))
    assert read_gguf(model).metadata["qwen35moe.block_count"] == 8
    size = model.stat().st_size
    with open(model, "r+b") as fh:
        fh.truncate(size - 1000)
    with pytest.raises(TunerError, match="truncated"):
        read_gguf(model)

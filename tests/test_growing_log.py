"""tuner.growing_log: a child's log read incrementally, keeping its first and last bytes, never all of it."""

from __future__ import annotations

import tracemalloc
from pathlib import Path

from tuner.growing_log import GrowingLog


def _append(path: Path, data: bytes) -> None:
    with open(path, "ab") as fh:
        fh.write(data)


def test_a_log_under_the_bounds_reads_whole_however_it_was_appended(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.touch()
    log = GrowingLog(path, head_bytes=10, tail_bytes=20)
    written = b""
    for piece in (b"abc\n", b"defghij", b"kl\nmnop", b"", b"qrs\n"):
        _append(path, piece)
        written += piece
        assert log.text() == written.decode()
    assert log.read_bytes == len(written) and log.skipped_bytes == 0


def test_a_log_past_the_bounds_keeps_its_head_and_its_tail_and_says_what_it_skipped(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.touch()
    log = GrowingLog(path, head_bytes=8, tail_bytes=12)
    lines = [f"line {i:03d}\n".encode() for i in range(50)]  # 9 bytes each
    for line in lines:
        _append(path, line)
        log.update()
    text = log.text()
    assert text.startswith("line 000")
    assert "[tuner: 430 bytes of this log were not read]" in text  # 450 - 8 - 12
    assert text.endswith("line 049\n") and "line 048" not in text  # the tail from its first whole line


def test_what_a_flood_wrote_between_two_reads_is_skipped_unread(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    with open(path, "wb") as fh:
        fh.write(b"main: loading model\n")
        fh.seek(1 << 40)  # a terabyte of hole: reading it would take hours
        fh.write(b"\nerror loading model: the end\n")
    log = GrowingLog(path, head_bytes=1 << 20, tail_bytes=1 << 20)
    tracemalloc.start()
    text = log.text()
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert text.startswith("main: loading model\n") and text.endswith("error loading model: the end\n")
    assert peak < 16 << 20 and len(text) < 3 << 20
    assert log.read_bytes == path.stat().st_size


def test_a_log_that_was_replaced_by_a_shorter_one_is_read_from_its_start(tmp_path: Path) -> None:
    path = tmp_path / "x.log"
    path.write_bytes(b"first run, a long line\n")
    log = GrowingLog(path)
    assert log.text() == "first run, a long line\n"
    path.write_bytes(b"second\n")
    assert log.text() == "second\n"


def test_a_missing_log_reads_as_empty(tmp_path: Path) -> None:
    log = GrowingLog(tmp_path / "none.log")
    assert log.text() == "" and not log.grew_since(log.read_bytes)

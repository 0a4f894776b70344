from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tuner.paths import write_atomic


def test_write_atomic_replaces_the_file_whole_and_readable(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "result.json"
    write_atomic(target, "old\n")
    write_atomic(target, b"new\n")
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert sorted(p.name for p in target.parent.iterdir()) == ["result.json"]


def test_write_atomic_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "profile.yaml"
    write_atomic(target, "kept\n")
    with pytest.raises(TypeError):
        write_atomic(target, object())  # type: ignore[arg-type]  # fails after the temporary file exists
    assert target.read_text() == "kept\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["profile.yaml"]

from __future__ import annotations

import stat
import zipfile
from pathlib import Path

import pytest

from tuner import paths
from tuner.errors import TunerError
from tuner.paths import write_atomic

REPO = Path(__file__).resolve().parent.parent


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


def test_paths_follow_their_environment_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNER_CATALOG_DIR", str(tmp_path / "p"))
    monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "c"))
    monkeypatch.setenv("TUNER_CONFIG_DIR", str(tmp_path / "k"))
    assert (paths.catalog_dir(), paths.cache_dir(), paths.config_dir()) == (
        tmp_path / "p",
        tmp_path / "c",
        tmp_path / "k",
    )


def test_paths_default_to_the_repo_profiles_folder_and_user_dirs(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("TUNER_CATALOG_DIR", "TUNER_CACHE_DIR", "TUNER_CONFIG_DIR"):
        monkeypatch.delenv(name, raising=False)
    # the editable install maps the package tuner.catalogs onto the repository's profiles/
    assert paths.catalog_dir() == REPO / "profiles"
    assert (paths.catalog_dir() / "gpus.yaml").is_file()
    assert paths.cache_dir().name == "tuner" and paths.config_dir().name == "tuner"
    assert paths.cache_dir() != paths.config_dir()


def test_catalogs_inside_a_zip_are_a_tuner_error_naming_the_override(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNER_CATALOG_DIR", raising=False)
    archive = tmp_path / "tuner.zip"
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("tuner/catalogs/gpus.yaml", "gpus: {}\n")
    monkeypatch.setattr(paths, "files", lambda _package: zipfile.Path(archive, "tuner/catalogs/"))
    with pytest.raises(TunerError, match="not on the file system") as raised:
        paths.catalog_dir()
    assert raised.value.hint is not None and "TUNER_CATALOG_DIR" in raised.value.hint


def test_an_install_without_the_catalogs_package_is_a_tuner_error_saying_to_reinstall(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNER_CATALOG_DIR", raising=False)

    def missing(package: str) -> Path:
        raise ModuleNotFoundError(f"No module named {package!r}")

    monkeypatch.setattr(paths, "files", missing)
    with pytest.raises(TunerError, match=r"no package tuner\.catalogs") as raised:
        paths.catalog_dir()
    assert raised.value.hint is not None and "reinstall" in raised.value.hint

"""Where the tuner reads its shipped catalogs and keeps its cache and config. Reads the environment; creates nothing.

Each directory can be moved with an environment variable (handy in tests and containers):

- ``TUNER_CATALOG_DIR``: the catalogs shipped with the tool (``gpus.yaml``, ``models/``); default the package's own
  copy, ``tuner.catalogs`` (edited in the repository's top-level ``profiles/``, installed there by pyproject.toml).
  Not to be confused with the measured-speed profile (:mod:`tuner.profile_store`), which lives in the config dir.
- ``TUNER_CACHE_DIR``: downloads, builds, measurements; default the platform's user cache dir for ``tuner``.
- ``TUNER_CONFIG_DIR``: saved settings; default the platform's user config dir for ``tuner``.
"""

from __future__ import annotations

import os
from importlib.resources import files
from pathlib import Path
from typing import Any

import platformdirs

from tuner.errors import TunerError

_APP_NAME = "tuner"
CATALOG_ENV = "TUNER_CATALOG_DIR"
CATALOG_PACKAGE = "tuner.catalogs"


def _from_env(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def catalog_dir() -> Path:
    """The folder of the shipped catalogs: ``TUNER_CATALOG_DIR``, else the installed package ``tuner.catalogs``
    (for an editable install, the repository's ``profiles/`` itself)."""
    override = _from_env(CATALOG_ENV)
    if override is not None:
        return override
    try:
        found = files(CATALOG_PACKAGE)
    except ModuleNotFoundError:  # an editable install made before the catalogs became a package
        raise TunerError(f"tuner's catalogs are not installed (no package {CATALOG_PACKAGE})",
                         hint="reinstall tuner: pip install -e . in the checkout") from None
    if not isinstance(found, Path):  # a zipped install: the loaders glob and stat real files
        raise TunerError(f"tuner's catalogs are not on the file system ({found})",
                         hint=f"install tuner unzipped, or set {CATALOG_ENV} to a copy of its profiles/ folder")
    return found


def cache_dir() -> Path:
    return _from_env("TUNER_CACHE_DIR") or Path(platformdirs.user_cache_dir(_APP_NAME))


def config_dir() -> Path:
    return _from_env("TUNER_CONFIG_DIR") or Path(platformdirs.user_config_dir(_APP_NAME))


def load_yaml(path: Path) -> Any:
    """Parse a YAML file with libyaml's loader when PyYAML has it (several times faster than the pure-Python one)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)


def write_atomic(path: Path, data: str | bytes, *, mode: int = 0o644, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one, never a part: a temporary
    file in the same folder, flushed to disk (unless ``durable`` is False: caches that are checked when read), then
    renamed over ``path``. An interruption leaves no temporary file."""
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode("utf-8") if isinstance(data, str) else data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

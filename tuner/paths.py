"""Where the tuner reads its profiles and keeps its cache and config. Reads the environment; creates nothing.

Each directory can be moved with an environment variable (handy in tests and containers):

- ``TUNER_PROFILES_DIR``: the catalogs shipped with the tool (``gpus.yaml``, ...); default ``<repo>/profiles``.
- ``TUNER_CACHE_DIR``: downloads, builds, measurements; default the platform's user cache dir for ``tuner``.
- ``TUNER_CONFIG_DIR``: saved settings; default the platform's user config dir for ``tuner``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import platformdirs

_APP_NAME = "tuner"


def _from_env(name: str) -> Path | None:
    value = os.environ.get(name, "").strip()
    return Path(value).expanduser() if value else None


def profiles_dir() -> Path:
    return _from_env("TUNER_PROFILES_DIR") or Path(__file__).resolve().parent.parent / "profiles"


def cache_dir() -> Path:
    return _from_env("TUNER_CACHE_DIR") or Path(platformdirs.user_cache_dir(_APP_NAME))


def config_dir() -> Path:
    return _from_env("TUNER_CONFIG_DIR") or Path(platformdirs.user_config_dir(_APP_NAME))


def load_yaml(path: Path) -> Any:
    """Parse a YAML file with libyaml's loader when PyYAML has it (several times faster than the pure-Python one)."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    return yaml.load(path.read_text(encoding="utf-8"), Loader=loader)

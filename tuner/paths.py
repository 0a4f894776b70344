"""Where the tuner reads its shipped catalogs and keeps its cache and config. Reads the environment; creates nothing.

Each directory can be moved with an environment variable (handy in tests and containers):

- ``TUNER_CATALOG_DIR``: the catalogs shipped with the tool (``gpus.yaml``, ``models/``); default the package's own
  copy, ``tuner.catalogs`` (edited in the repository's top-level ``profiles/``, installed there by pyproject.toml).
  Not to be confused with the measured-speed profile (:mod:`tuner.profile_store`), which lives in the config dir.
- ``TUNER_CACHE_DIR``: downloads, builds, measurements; default the platform's user cache dir for ``tuner``.
- ``TUNER_CONFIG_DIR``: saved settings; default the platform's user config dir for ``tuner``.
"""

from __future__ import annotations

import errno
import os
from importlib.resources import files
from pathlib import Path
from typing import Any

import platformdirs
import yaml

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


MAX_YAML_BYTES = 64 << 20
"""The largest YAML file tuner reads (catalogs, the profile): the shipped catalogs are a few hundred kB, a profile
of 100 models with 400 measurements each is ~50 MB."""


class YamlRefused(yaml.YAMLError):
    """A YAML file tuner will not load: too large, not UTF-8, or using anchors and aliases. A ``yaml.YAMLError``, so
    a caller that reports bad YAML reports these the same way."""


def read_text_bounded(path: Path, max_bytes: int, *, what: str = "file") -> str:
    """``path``'s text (UTF-8), refused with a one-line TunerError when it is larger than ``max_bytes`` or is not
    UTF-8. OSError as ``open`` raises it (a missing file is the caller's to handle)."""
    with open(path, "rb") as fh:
        data = fh.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise TunerError(f"{what} {path} is larger than the limit of {max_bytes} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise TunerError(f"{what} {path} is not UTF-8 text (byte {error.start} is {data[error.start]:#04x})") from None


def load_yaml(path: Path, *, max_bytes: int = MAX_YAML_BYTES) -> Any:
    """Parse a YAML file (libyaml's loader when PyYAML has it: several times faster than the pure-Python one), safely:
    at most ``max_bytes``, UTF-8, and without anchors and aliases (:class:`YamlRefused` otherwise). An alias is how a
    600-byte "billion laughs" file expands to gigabytes once walked; tuner's files never need one. Nesting is bounded
    by the parser: some libyaml builds refuse more than 1000 levels, the others and the pure-Python loader recurse,
    and a nesting that exhausts Python's recursion limit is refused too (:func:`load_yaml_text`)."""
    try:
        text = read_text_bounded(Path(path), max_bytes, what="YAML file")
    except TunerError as error:
        raise YamlRefused(str(error)) from None
    return load_yaml_text(text, str(path))


def load_yaml_text(text: str, source: str) -> Any:
    """:func:`load_yaml` for text already read; ``source`` names it in a refusal."""
    try:
        return yaml.load(text, Loader=_loader(source))
    except RecursionError:
        raise YamlRefused(f"{source} is nested deeper than tuner reads YAML") from None


def _loader(source: str) -> Any:
    base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

    class NoAliasLoader(base):  # type: ignore[misc, valid-type]
        def get_single_data(self) -> Any:
            node = self.get_single_node()  # libyaml composes an alias as the anchored node itself: found by identity
            if node is None:
                return None
            _refuse_shared_nodes(node, source)
            return self.construct_document(node)

    return NoAliasLoader


def _refuse_shared_nodes(root: Any, source: str) -> None:
    from yaml.nodes import MappingNode, SequenceNode

    seen: set[int] = set()
    stack = [root]
    while stack:
        node = stack.pop()
        if id(node) in seen:
            raise YamlRefused(f"{source} uses a YAML alias (*name, anchored on line {node.start_mark.line + 1}): "
                              "tuner does not expand aliases")
        seen.add(id(node))
        if isinstance(node, SequenceNode):
            stack.extend(node.value)
        elif isinstance(node, MappingNode):
            for key, value in node.value:
                stack += (key, value)


def write_atomic(path: Path, data: str | bytes, *, mode: int = 0o644, durable: bool = True) -> Path:
    """Write ``data`` to ``path`` so that a reader sees the old file or the whole new one, never a part: a temporary
    file in the same folder, flushed to disk (unless ``durable`` is False: caches that are checked when read), then
    renamed over ``path``. An interruption leaves no temporary file."""
    import tempfile

    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except FileExistsError:  # a file where a folder should be: say that, not "File exists"
        raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(path.parent)) from None
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

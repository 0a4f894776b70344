"""Values that come from outside (a Hub answer, a file name in a listing, a repo id, a shard name) checked against
their grammar before they name anything on disk, and the one helper that builds a path from them.

Every check raises a one-line :class:`~tuner.errors.TunerError` that shows the value with ``repr`` (so control
characters and escape sequences print as ``\\x1b``, never raw), and returns the value unchanged when it is fine.
:func:`path_under` is the last line of defence: whatever the grammar let through, a path built from outside data
must resolve inside its root.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

from tuner.errors import TunerError

# Repo ids as the Hub accepts them (huggingface_hub.utils.validate_repo_id): "owner/name", each part 1-96 of
# [A-Za-z0-9_.-], starting and ending with a letter, digit or "_", no "--" or "..", not ending in ".git".
_REPO_PART = r"[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
_REPO_ID_RE = re.compile(rf"{_REPO_PART}/{_REPO_PART}")
# A git commit id: 40 hex digits (SHA-1), or 64 (SHA-256 repositories).
_COMMIT_RE = re.compile(r"[0-9a-f]{40}(?:[0-9a-f]{24})?")
# Branch and tag names, "refs/pr/1", or a commit: slash-separated parts of [A-Za-z0-9._+-], none starting with ".".
_REV_PART_RE = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9._+-]*")
MAX_REVISION_CHARS = 255
# A file name in a repo listing: the Hub stores paths of at most a few hundred characters; a POSIX file name part
# is at most 255 bytes (NAME_MAX).
MAX_REPO_PATH_CHARS = 1024
MAX_NAME_BYTES = 255
MAX_REPO_PATH_PARTS = 32
# Unicode format characters that reorder or hide text on a terminal (bidi overrides, isolates, zero-width marks).
_HIDDEN_FORMAT = frozenset("\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
                           "\u2066\u2067\u2068\u2069\ufeff")


def has_control(text: str) -> bool:
    """Whether ``text`` holds a control character (C0, DEL, C1) or a bidi/zero-width format character."""
    return any(unicodedata.category(c) == "Cc" or c in _HIDDEN_FORMAT for c in text)


def visible(text: str) -> str:
    """``text`` with every control and bidi/zero-width character written as a ``\\xNN`` / ``\\uNNNN`` escape, so
    printing it cannot move the cursor, change colours or reorder a line."""
    if not has_control(text):
        return text
    out = []
    for c in text:
        if unicodedata.category(c) == "Cc" or c in _HIDDEN_FORMAT:
            code = ord(c)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(c)
    return "".join(out)


def shown(value: object, limit: int = 80) -> str:
    """``repr(value)`` cut to ``limit`` characters: how a refusal quotes a value it did not choose (a repr escapes
    control characters; the cut keeps a 16 MB string from becoming the error line)."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 1]}…"


def check_repo_id(repo: object, *, what: str = "repo id") -> str:
    """``owner/name`` as the Hub allows it; a TunerError naming the value otherwise."""
    if not isinstance(repo, str) or not _REPO_ID_RE.fullmatch(repo) or "--" in repo or ".." in repo \
            or repo.endswith(".git"):
        raise TunerError(f"invalid Hugging Face {what} {shown(repo)}: it must be owner/name, each part 1-96 letters, "
                         "digits, '-', '_' or '.', not starting or ending with '-' or '.'")
    return repo


def check_commit(sha: object, *, where: str) -> str:
    """A commit id (40 or 64 lower-case hex digits), as the Hub's ``sha`` field holds it."""
    if not isinstance(sha, str) or not _COMMIT_RE.fullmatch(sha):
        raise TunerError(f"{where}: {shown(sha)} is not a commit id (40 hex digits)")
    return sha


def is_commit(text: str) -> bool:
    return _COMMIT_RE.fullmatch(text) is not None


def check_revision(rev: object) -> str:
    """A branch, tag, ``refs/pr/N`` or commit id: parts of ``[A-Za-z0-9._+-]`` joined by ``/``, none ``.``/``..``
    or starting with a dot, at most 255 characters."""
    if not isinstance(rev, str) or not 0 < len(rev) <= MAX_REVISION_CHARS \
            or not all(_REV_PART_RE.fullmatch(p) for p in rev.split("/")) or rev.endswith(".lock"):
        raise TunerError(f"invalid revision {shown(rev)}: a branch, tag or commit is made of letters, digits and "
                         "'._+-', in parts joined by '/'")
    return rev


def check_repo_path(path: object, *, where: str) -> str:
    """A file's path inside a repo, as a listing gives it: relative, ``/``-separated, no empty, ``.`` or ``..`` part,
    no backslash or control character, each part at most 255 bytes."""
    problem = _repo_path_problem(path)
    if problem:
        raise TunerError(f"{where}: refusing file name {shown(path)} ({problem})")
    assert isinstance(path, str)
    return path


def _repo_path_problem(path: object) -> str | None:
    if not isinstance(path, str):
        return "not a string"
    if not path or len(path) > MAX_REPO_PATH_CHARS:
        return f"empty or longer than {MAX_REPO_PATH_CHARS} characters"
    if has_control(path) or "\\" in path:
        return "control character or backslash"
    parts = path.split("/")
    if len(parts) > MAX_REPO_PATH_PARTS:
        return f"more than {MAX_REPO_PATH_PARTS} folders deep"
    for part in parts:
        if part in ("", ".", ".."):
            return "absolute, or an empty, '.' or '..' part"
        if len(part.encode("utf-8", errors="surrogatepass")) > MAX_NAME_BYTES:
            return f"a part longer than {MAX_NAME_BYTES} bytes"
    return None


def path_under(root: Path, *parts: str, what: str) -> Path:
    """``root / parts…``, required to resolve (symbolic links followed) strictly inside ``root``; ``what`` names the
    outside value in the refusal. Use it wherever a cache or config path is built from data tuner did not choose."""
    base = Path(root).expanduser().resolve()
    target = base.joinpath(*parts).resolve()
    if target == base or not target.is_relative_to(base):
        raise TunerError(f"refusing {what}: {shown('/'.join(parts))} leads outside {base}")
    return target

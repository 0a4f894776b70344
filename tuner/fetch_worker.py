"""One Hub download in a process of its own: ``python -m tuner.fetch_worker``, started by :mod:`tuner.fetch`.

Why a process: :func:`huggingface_hub.hf_hub_download` blocks in socket reads with per-read timeouts only, and
Python cannot interrupt a thread stuck in a read. A child process can always be stopped, group and all, so a stalled
or trickling download, Ctrl-C or SIGTERM end it at once (:mod:`tuner.procgroup`).

Protocol: one JSON job on stdin (``repo``, ``file``, ``revision``, ``endpoint``, ``cache_dir``; the token, if any,
in ``HF_TOKEN``); JSON lines on stdout: ``{"progress": [done, total]}`` as bytes arrive (``total`` may be null),
then one ``{"path": ..., "downloaded": n}`` or ``{"error": "one line"}``. It imports huggingface_hub and nothing of
tuner beyond :mod:`tuner.errors`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from typing import Any

from tuner.errors import TunerError

ProgressFn = Callable[[int, int | None], None]


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _progress_class(on_progress: ProgressFn, counter: list[int]) -> type[Any]:
    """A silent tqdm for ``hf_hub_download(tqdm_class=...)`` that forwards byte counts to ``on_progress``."""
    from tqdm.std import tqdm

    class _Forward(tqdm):  # type: ignore[misc]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.pop("name", None)
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._done_bytes = int(kwargs.get("initial") or 0)
            self._total_bytes = kwargs.get("total")

        def update(self, n: float | None = 1) -> bool | None:
            step = int(n or 0)
            self._done_bytes += step
            counter[0] += step
            on_progress(self._done_bytes, self._total_bytes)
            return None

    return _Forward


def download_here(repo: str, file_name: str, *, revision: str | None, endpoint: str, token: str | None,
                  cache_dir: str | None, on_progress: ProgressFn) -> tuple[str, int]:
    """The download itself, in this process: (local path, bytes downloaded now; 0 if it was cached)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    counter = [0]
    where = f"{repo}/{file_name}" + (f"@{revision}" if revision else "")
    try:
        path = hf_hub_download(repo, file_name, revision=revision, endpoint=endpoint, token=token,
                               cache_dir=cache_dir, tqdm_class=_progress_class(on_progress, counter))
    except LocalEntryNotFoundError as exc:  # offline (or the endpoint is down) and not in the cache
        raise TunerError(f"cannot download {where}: the Hub is unreachable and the file is not cached "
                         f"({_brief(exc)})") from None
    except GatedRepoError:
        raise TunerError(f"{repo} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise TunerError(f"Hugging Face repo {repo} does not exist or is private",
                         hint="check the name; for a private repo set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise TunerError(f"{repo} has no revision {revision!r}") from None
    except EntryNotFoundError:
        raise TunerError(f"{repo} has no file {file_name}" + (f" at {revision}" if revision else "")) from None
    except (HfHubHTTPError, OSError) as exc:
        raise TunerError(f"downloading {where} failed: {_brief(exc)}") from None
    except Exception as exc:  # the Hub library's HTTP client errors (httpx / httpx2, by version)
        if type(exc).__module__.split(".")[0].startswith(("httpx", "huggingface_hub")):
            raise TunerError(f"downloading {where} failed: {type(exc).__name__}: {_brief(exc)}") from None
        raise
    if counter[0] == 0:
        size = os.path.getsize(path)
        on_progress(size, size)  # already cached: report it complete
    return path, counter[0]


def _brief(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__


def main() -> int:
    # as tuner.cli sets them: no telemetry call, no retry chatter on stderr (read before huggingface_hub loads)
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("HF_HUB_VERBOSITY", "error")
    try:
        job = json.loads(sys.stdin.read())
        path, downloaded = download_here(
            str(job["repo"]), str(job["file"]), revision=job.get("revision"), endpoint=str(job["endpoint"]),
            token=os.environ.get("HF_TOKEN") or None, cache_dir=job.get("cache_dir"),
            on_progress=lambda done, total: _say({"progress": [done, total]}))
    except TunerError as error:
        _say({"error": error.one_line()})
        return 1
    except Exception as error:  # a bug, or the Hub library's: still one line for the parent
        _say({"error": f"{type(error).__name__}: {_brief(error)}"})
        return 1
    _say({"path": path, "downloaded": downloaded})
    return 0


if __name__ == "__main__":
    sys.exit(main())

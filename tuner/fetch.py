"""Getting a planned quant's files onto this machine, so llama-server can open them.

* ``source == "local"``: the files are used where they are (checked to exist, nothing is copied).
* ``source == "hub"`` or ``"card"`` (a card resolves to its default repo and file names): every shard of the quant,
  plus the vision projector when vision is on and the MTP sidecar when the plan drafts with it, is downloaded with
  :func:`huggingface_hub.hf_hub_download` into the Hub's own cache (``HF_HOME`` / ``HF_HUB_CACHE``), so files
  already there are not fetched again and other tools share them. ``HF_ENDPOINT`` and ``HF_TOKEN`` (or the token
  ``hf auth login`` saved) are honoured, read when the download starts, as :mod:`tuner.remote` reads them (the Hub
  library itself reads ``HF_ENDPOINT`` only at import).

Progress goes to ``on_progress(file_name, done_bytes, total_bytes)``; nothing here prints. Failures a user can fix
(no network, a gated repo, a missing file) are :class:`~tuner.errors.TunerError`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tuner.candidate import QuantCandidate
from tuner.errors import TunerError
from tuner.remote import hub_endpoint, hub_token

FetchProgressFn = Callable[[str, int, int | None], None]


@dataclass(frozen=True)
class FetchedModel:
    """Local paths of a quant, ready for ``llama-server -m`` (the first shard) and ``--mmproj``."""

    model_path: Path  # the first shard; llama.cpp finds the others beside it
    shard_paths: tuple[Path, ...]
    mmproj_path: Path | None
    downloaded_bytes: int  # 0 when everything was local or already in the Hub cache
    mtp_path: Path | None = None  # the MTP sidecar (-md), when the plan drafts with one


def fetch_candidate(candidate: QuantCandidate, *, vision: bool = False, on_progress: FetchProgressFn | None = None,
                    cache_dir: Path | None = None, mtp_sidecar: bool = False) -> FetchedModel:
    """Local paths for every file of ``candidate`` (downloading what is not here), plus the mmproj if ``vision`` and
    its MTP sidecar if ``mtp_sidecar``. ``cache_dir``: the Hub cache to use (default: the Hub library's, from
    ``HF_HUB_CACHE`` / ``HF_HOME``)."""
    if not candidate.files:
        raise TunerError(f"quant {candidate.quant} lists no files")
    if mtp_sidecar and not candidate.mtp_sidecar:
        raise TunerError(f"quant {candidate.quant} has no MTP sidecar to draft with")
    if candidate.source == "local":
        fetched = _local(candidate, vision)
        if mtp_sidecar:
            path = Path(str(candidate.mtp_sidecar)).expanduser()
            if not path.is_file():
                raise TunerError(f"MTP sidecar {path} does not exist")
            fetched = replace(fetched, mtp_path=path)
        return fetched
    if candidate.source in ("hub", "card"):
        return _from_hub(candidate, vision, on_progress, cache_dir, mtp_sidecar)
    raise TunerError(f"quant {candidate.quant} comes from {candidate.source!r}, which tuner cannot fetch")


def _local(candidate: QuantCandidate, vision: bool) -> FetchedModel:
    paths = tuple(Path(f).expanduser() for f in candidate.files)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise TunerError(f"model file {missing[0]} does not exist"
                         + (f" (and {len(missing) - 1} more shards)" if len(missing) > 1 else ""))
    mmproj = None
    if vision:
        if not candidate.mmproj:
            raise TunerError(f"vision is on but no mmproj file was found beside {paths[0]}",
                             hint="put the mmproj-*.gguf next to the model, or leave vision off")
        mmproj = Path(candidate.mmproj).expanduser()
        if not mmproj.is_file():
            raise TunerError(f"mmproj file {mmproj} does not exist")
    return FetchedModel(paths[0], paths, mmproj, 0)


def _from_hub(candidate: QuantCandidate, vision: bool, on_progress: FetchProgressFn | None,
              cache_dir: Path | None, mtp_sidecar: bool = False) -> FetchedModel:
    if not candidate.repo:
        raise TunerError(f"quant {candidate.quant} has no Hugging Face repo to download it from")
    wanted = list(candidate.files)
    if vision:
        if not candidate.mmproj:
            raise TunerError(f"vision is on but {candidate.repo} has no mmproj file for {candidate.quant}",
                             hint="leave vision off, or pick a repo that ships an mmproj-*.gguf")
        wanted.append(candidate.mmproj)
    if mtp_sidecar:
        wanted.append(str(candidate.mtp_sidecar))
    local: list[Path] = []
    downloaded = 0
    for name in wanted:
        path, n_bytes = download_file(candidate.repo, name, revision=candidate.revision, on_progress=on_progress,
                                      cache_dir=cache_dir)
        local.append(path)
        downloaded += n_bytes
    shards = tuple(local[: len(candidate.files)])
    return FetchedModel(shards[0], shards, local[len(shards)] if vision else None, downloaded,
                        local[-1] if mtp_sidecar else None)


def _progress_class(file_name: str, on_progress: FetchProgressFn | None, counter: list[int]) -> type[Any]:
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
            if on_progress is not None:
                on_progress(file_name, self._done_bytes, self._total_bytes)
            return None

    return _Forward


def download_file(repo: str, file_name: str, *, revision: str | None = None,
                  on_progress: FetchProgressFn | None = None, cache_dir: Path | None = None) -> tuple[Path, int]:
    """One file of a Hub repo in the Hub cache: (local path, bytes downloaded now; 0 if it was cached)."""
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
        path = hf_hub_download(repo, file_name, revision=revision, endpoint=hub_endpoint(), token=hub_token(),
                               cache_dir=cache_dir, tqdm_class=_progress_class(file_name, on_progress, counter))
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
    if on_progress is not None and counter[0] == 0:
        size = Path(path).stat().st_size
        on_progress(file_name, size, size)  # already cached: report it complete
    return Path(path), counter[0]


def _brief(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:200] or type(exc).__name__

"""Quants in a Hugging Face repo (``owner/repo[@revision][:QUANT]``), found without the weights.

A Hub repo is listed once through ``huggingface_hub`` (file names and sizes, and the commit the revision points to);
its GGUF files are grouped into quants by :mod:`tuner.quant_files` (as a local folder's are), and each quant's
header is read with HTTP range requests to ``{endpoint}/{repo}/resolve/{commit}/{path}``: a few MB per shard, never
the tensor data. Parsed headers are cached on disk under ``<cache>/hub-headers/<repo>/<commit>/<path>.json`` (a
commit never changes, so neither does the entry), and the listing beside them, so a second look costs one API call,
or none when the Hub cannot be reached.

``HF_ENDPOINT`` and ``HF_TOKEN`` are honoured (the token also from ``hf auth login``); the token goes to the Hub as
``Authorization: Bearer`` and is dropped by httpx when the Hub redirects to its CDN.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from tuner import __version__
from tuner.candidate import ProgressFn, QuantCandidate
from tuner.errors import TunerError
from tuner.gguf_file import (
    HEADER_CACHE_FORMAT,
    GgufHeader,
    NeedMoreBytes,
    ParsedShard,
    check_data_fits,
    join_shards,
    parse_header,
    shard_from_dict,
    shard_to_dict,
)
from tuner.paths import cache_dir, write_atomic
from tuner.quant_files import FileGroup, GroupedFiles, candidates_from_headers, group_gguf_files

DEFAULT_ENDPOINT = "https://huggingface.co"
CACHE_SUBDIR = "hub-headers"
REMOTE_FIRST_READ = 2 << 20  # first range request per shard; Qwen3.5 headers are 10-13 MB and grow from here
REMOTE_MIN_GROW = 1 << 20
HEADER_WORKERS = 8  # parallel range readers
HTTP_TIMEOUT_S = 30.0
_HUB_REF_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^:@\s]+))?(?::(?P<quant>[\w.-]+))?$")


# --- references -------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HubRef:
    repo: str
    revision: str | None = None  # None = main
    quant: str | None = None


def parse_hub_ref(ref: str) -> HubRef:
    """``owner/repo``, ``owner/repo:Q4_K_M``, ``owner/repo@rev:Q4_K_M``."""
    m = _HUB_REF_RE.match(ref.strip())
    if not m or ".." in m.group("repo"):
        raise TunerError(f"{ref!r} is neither a local path nor a Hugging Face repo (owner/name[@revision][:QUANT])")
    return HubRef(m.group("repo"), m.group("rev"), m.group("quant"))


# --- environment ---------------------------------------------------------------------------------------------------

def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or "").strip().rstrip("/") or DEFAULT_ENDPOINT


def hub_token() -> str | None:
    token = (os.environ.get("HF_TOKEN") or "").strip()
    if token:
        return token
    try:
        from huggingface_hub import get_token

        return get_token()
    except Exception:  # a broken token file or OIDC setup must not stop a public read
        return None


# --- the header cache ---------------------------------------------------------------------------------------------

def _safe_parts(path: str) -> list[str]:
    parts = [p for p in PurePosixPath(path).parts if p not in ("", "/")]
    if not parts or any(p in (".", "..") or "\\" in p for p in parts):
        raise TunerError(f"refusing odd repo file path {path!r}")
    return parts


def _repo_cache(repo: str) -> Path:
    return cache_dir().joinpath(CACHE_SUBDIR, *_safe_parts(repo))


def _header_cache_path(listing: HubListing, path: str) -> Path:
    parts = _safe_parts(path)
    return _repo_cache(listing.repo).joinpath(listing.commit, *parts[:-1], parts[-1] + ".json")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# --- listing ------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HubListing:
    repo: str
    revision: str  # what was asked for ("main" by default)
    commit: str  # the commit sha it resolved to
    files: tuple[tuple[str, int], ...]
    endpoint: str
    from_cache: bool = False

    def grouped(self) -> GroupedFiles:
        return group_gguf_files(self.files)

    def url(self, path: str) -> str:
        return f"{self.endpoint}/{self.repo}/resolve/{self.commit}/{quote(path)}"


def _network_errors() -> tuple[type[BaseException], ...]:
    """What "the Hub cannot be reached" raises: huggingface_hub's own offline error and its HTTP stack's transport
    errors (httpx2 in huggingface_hub 2.x, httpx in 1.x, requests before)."""
    import importlib

    from huggingface_hub.errors import OfflineModeIsEnabled

    errors: list[type[BaseException]] = [OfflineModeIsEnabled, OSError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"), ("requests", "ConnectionError"),
                         ("requests", "Timeout")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def list_hub_repo(repo: str, revision: str | None = None) -> HubListing:
    """The repo's files and sizes at ``revision`` (default main) and the commit it points to: one API call, or the
    cached listing of that revision when the Hub cannot be reached."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint, rev = hub_endpoint(), revision or "main"
    ref_file = _repo_cache(repo) / "refs" / f"{quote(rev, safe='')}.json"
    api = HfApi(endpoint=endpoint, token=hub_token(), library_name="tuner", library_version=__version__)
    try:
        info = api.model_info(repo, revision=rev, files_metadata=True, timeout=HTTP_TIMEOUT_S)
    except GatedRepoError:
        raise TunerError(f"{repo} is gated: accept its terms on the Hub and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise TunerError(f"Hugging Face repo {repo} has no revision {rev!r}") from None
    except RepositoryNotFoundError:
        raise TunerError(f"Hugging Face repo {repo} not found at {endpoint} (a private repo needs HF_TOKEN)") from None
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        raise TunerError(f"the Hub answered HTTP {status} listing {repo}") from None
    except _network_errors() as error:
        cached = _cached_listing(repo, rev, ref_file, endpoint)
        if cached is None:
            reason = " ".join(str(error).split()) or type(error).__name__
            raise TunerError(f"cannot reach {endpoint} to list {repo} ({reason}) and it was never listed before") \
                from None
        return cached
    commit = info.sha or rev
    files = tuple(sorted((s.rfilename, int(s.size if s.size is not None else (s.lfs.size if s.lfs else 0)))
                         for s in info.siblings or ()))
    listing = HubListing(repo, rev, commit, files, endpoint)
    with contextlib.suppress(OSError):  # the cache is an optimisation
        write_atomic(_repo_cache(repo) / f"{commit}.listing.json",
                      json.dumps({"format": HEADER_CACHE_FORMAT, "files": [list(f) for f in files]}))
        write_atomic(ref_file, json.dumps({"commit": commit}))
    return listing


def _cached_listing(repo: str, rev: str, ref_file: Path, endpoint: str) -> HubListing | None:
    ref = _read_json(ref_file)
    commit = ref.get("commit") if isinstance(ref, dict) else None
    if not commit and re.fullmatch(r"[0-9a-f]{40}", rev):
        commit = rev
    if not commit:
        return None
    data = _read_json(_repo_cache(repo) / f"{commit}.listing.json")
    if not isinstance(data, dict) or data.get("format") != HEADER_CACHE_FORMAT:
        return None
    files = tuple((str(p), int(s)) for p, s in data["files"])
    return HubListing(repo, rev, commit, files, endpoint, from_cache=True)


# --- range reads --------------------------------------------------------------------------------------------------

class _RangeReader:
    """Prefixes of one remote file, fetched incrementally with ``Range`` requests."""

    def __init__(self, client: Any, url: str, size_bytes: int, headers: dict[str, str], label: str) -> None:
        self.client, self.url, self.size, self.headers, self.label = client, url, size_bytes, headers, label
        self.buf = bytearray()

    def prefix(self, n: int) -> bytes:
        n = min(n, self.size)
        if len(self.buf) < n:
            self._fetch(len(self.buf), n - 1)
        return bytes(self.buf[:n])

    def _fetch(self, start: int, end: int) -> None:
        import httpx

        want = end - start + 1
        headers = {**self.headers, "Range": f"bytes={start}-{end}"}
        try:
            with self.client.stream("GET", self.url, headers=headers) as r:
                if r.status_code == 416:
                    raise TunerError(f"{self.label} is truncated: it ends before byte {start}")
                if r.status_code in (401, 403):
                    raise TunerError(f"access denied reading {self.label} (HTTP {r.status_code}; set HF_TOKEN)")
                if r.status_code == 404:
                    raise TunerError(f"{self.label} not found on the Hub (HTTP 404)")
                if r.status_code not in (200, 206):
                    raise TunerError(f"the Hub answered HTTP {r.status_code} reading {self.label}")
                skip = start if r.status_code == 200 else 0  # a server that ignores Range sends the whole file
                got = bytearray()
                for chunk in r.iter_bytes():
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    got += chunk
                    if len(got) >= want:
                        break
            final = str(r.url)
        except httpx.HTTPError as error:
            raise TunerError(f"reading {self.label}: {' '.join(str(error).split()) or type(error).__name__}") from None
        if final != self.url:  # the Hub redirected to its CDN: go there directly for the next range
            if httpx.URL(final).host != httpx.URL(self.url).host:
                self.headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
            self.url = final
        if len(got) < want and start + len(got) < self.size:
            raise TunerError(f"{self.label}: the Hub sent {len(got)} of {want} bytes asked for")
        self.buf += got[:want]


def read_remote_shard(client: Any, url: str, size_bytes: int, headers: dict[str, str], *, shard: int,
                      label: str, first_read: int | None = None) -> tuple[ParsedShard, int]:
    """Parse one remote shard's header, reading only its prefix; returns it and the bytes fetched."""
    reader = _RangeReader(client, url, size_bytes, headers, label)
    want = min(first_read or REMOTE_FIRST_READ, size_bytes)
    while True:
        buf = reader.prefix(want)
        try:
            parsed = parse_header(buf, shard=shard, source=label)
            break
        except NeedMoreBytes as more:
            if len(buf) >= size_bytes:
                raise TunerError(f"{label} is truncated: the header ends at byte {size_bytes}"
                                 " before the tensor table is complete") from None
            want = min(max(more.needed, len(buf) + REMOTE_MIN_GROW), size_bytes)
    check_data_fits(parsed, size_bytes, label)
    return parsed, len(reader.buf)


def header_size_hint(first_shard_header_bytes: int) -> int:
    """First read for the other quants of a repo, once one quant's first-shard header is known: the quants of one
    model share their tokenizer, so their headers are the same size give or take a few kB of metadata."""
    return first_shard_header_bytes + first_shard_header_bytes // 16 + (64 << 10)


@dataclass(frozen=True)
class HeaderStats:
    shards: int = 0
    from_cache: int = 0
    bytes_fetched: int = 0


_Job = tuple[int, int, str, int]  # (group index, shard index, path in repo, size)


def read_hub_headers(listing: HubListing, groups: Sequence[FileGroup], *,
                     on_progress: ProgressFn | None = None) -> tuple[list[GgufHeader], HeaderStats]:
    """The joined header of each group (all shards), from the cache or by range reads.

    Uncached reads start with one first shard alone (its header size tells how much to ask of the others, so they
    mostly take one request each), then run the rest in parallel."""
    import httpx

    jobs: list[_Job] = [(gi, si, path, size) for gi, g in enumerate(groups)
                        for si, (path, size) in enumerate(zip(g.files, g.sizes, strict=True))]
    results: dict[tuple[int, int], ParsedShard] = {}
    todo: list[_Job] = []
    for gi, si, path, size in jobs:
        hit = shard_from_dict(_read_json(_header_cache_path(listing, path)), si)
        if hit is not None and hit[1] == size:
            results[(gi, si)] = hit[0]
        else:
            todo.append((gi, si, path, size))
    cached = len(results)
    progress = {"done": cached, "fetched": 0}
    if on_progress:
        on_progress("reading GGUF headers", progress["done"], len(jobs))
    if todo:
        token = hub_token()
        headers = {"User-Agent": f"tuner/{__version__}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"

        def finish(job: _Job, parsed: ParsedShard, nbytes: int) -> None:
            results[(job[0], job[1])] = parsed
            progress["done"] += 1
            progress["fetched"] += nbytes
            with contextlib.suppress(OSError):  # the cache is an optimisation
                write_atomic(_header_cache_path(listing, job[2]), json.dumps(shard_to_dict(parsed, job[3])),
                             durable=False)
            if on_progress:
                on_progress("reading GGUF headers", progress["done"], len(jobs))

        with httpx.Client(follow_redirects=True, timeout=HTTP_TIMEOUT_S) as client:
            def read(job: _Job, first_read: int | None) -> tuple[ParsedShard, int]:
                return read_remote_shard(client, listing.url(job[2]), job[3], headers, shard=job[1],
                                         label=f"{listing.repo}/{job[2]}", first_read=first_read)

            firsts = [j for j in todo if j[1] == 0]
            hint = None
            if len(firsts) > 1:
                probe = firsts[0]
                parsed, nbytes = read(probe, None)
                finish(probe, parsed, nbytes)
                hint = header_size_hint(parsed.data_offset)
                todo = [j for j in todo if j is not probe]
            with ThreadPoolExecutor(max_workers=max(1, min(HEADER_WORKERS, len(todo)))) as pool:
                futures = {pool.submit(read, job, hint if job[1] == 0 else None): job for job in todo}
                try:
                    for fut in as_completed(futures):
                        finish(futures[fut], *fut.result())
                except BaseException:
                    for f in futures:
                        f.cancel()
                    raise
    headers_out = []
    for gi, g in enumerate(groups):
        parsed_shards = [results[(gi, si)] for si in range(len(g.files))]
        headers_out.append(join_shards([listing.url(p) for p in g.files], parsed_shards, list(g.sizes)))
    return headers_out, HeaderStats(len(jobs), cached, progress["fetched"])


# --- candidates ---------------------------------------------------------------------------------------------------

def hub_candidates(ref: str, on_progress: ProgressFn | None = None) -> list[QuantCandidate]:
    """Every quant of a Hub repo (or the one ``:QUANT`` names), best quality first, from headers only."""
    hub = parse_hub_ref(ref)
    if on_progress:
        on_progress(f"listing {hub.repo}", None, None)
    listing = list_hub_repo(hub.repo, hub.revision)
    grouped = listing.grouped()
    where = f"{hub.repo}@{hub.revision}" if hub.revision else hub.repo
    if not grouped.complete:
        raise TunerError(f"{where} holds no GGUF model files" + (" (only mmproj files)" if grouped.mmproj else ""))
    groups = [grouped.find(hub.quant, where)] if hub.quant else list(grouped.complete)
    headers, _ = read_hub_headers(listing, groups, on_progress=on_progress)
    return candidates_from_headers(headers, groups, source="hub", repo=hub.repo, revision=listing.commit,
                       mmproj=grouped.pick_mmproj())


def hub_quant_labels(ref: str) -> list[str]:
    """The quant labels of a Hub repo, from its listing alone (no header is read)."""
    hub = parse_hub_ref(ref)
    return [g.label for g in list_hub_repo(hub.repo, hub.revision).grouped().complete]

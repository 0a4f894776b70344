"""Quants in a Hugging Face repo (``owner/repo[@revision][:QUANT]``), found without the weights.

A Hub repo is listed once through ``huggingface_hub`` (file names and sizes, and the commit the revision points to);
its GGUF files are grouped into quants by :mod:`tuner.quant_files` (as a local folder's are), and each quant's
header is read with HTTP range requests to ``{endpoint}/{repo}/resolve/{commit}/{path}``: a few MB per shard, never
the tensor data. Parsed headers are cached on disk under ``<cache>/hub-headers/<repo>/<commit>/<path>.json`` (a
commit never changes, so neither does the entry), and the listing beside them, so a second look costs one API call,
or none when the Hub cannot be reached.

Everything the Hub answers is untrusted: the listing and the range reads are bounded in size and time and
validated (:mod:`tuner.hub_api`), and every cache path built from a repo id, commit or file name is checked to stay
inside the cache (:func:`tuner.untrusted.path_under`).

``HF_ENDPOINT`` and ``HF_TOKEN`` are honoured (the token also from ``hf auth login``); the token goes to the Hub as
``Authorization: Bearer`` and is dropped by httpx when the Hub redirects to its CDN.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote, urlsplit

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
from tuner.quant_files import FileGroup, GroupedFiles, candidates_from_headers, group_gguf_files, sidecar_layout
from tuner.records import read_json_file
from tuner.untrusted import check_commit, check_repo_id, check_repo_path, check_revision, is_commit, path_under, shown

DEFAULT_ENDPOINT = "https://huggingface.co"
CACHE_SUBDIR = "hub-headers"
REMOTE_FIRST_READ = 2 << 20  # first range request per shard; Qwen3.5 headers are 10-13 MB and grow from here
REMOTE_MIN_GROW = 1 << 20
HEADER_WORKERS = 8  # parallel range readers
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
        raise TunerError(f"{shown(ref)} is neither a local path nor a Hugging Face repo "
                         "(owner/name[@revision][:QUANT])")
    rev = m.group("rev")
    return HubRef(check_repo_id(m.group("repo")), check_revision(rev) if rev is not None else None, m.group("quant"))


# --- environment ---------------------------------------------------------------------------------------------------

def hub_endpoint() -> str:
    """``HF_ENDPOINT`` (an http or https URL) or the Hub."""
    endpoint = (os.environ.get("HF_ENDPOINT") or "").strip().rstrip("/") or DEFAULT_ENDPOINT
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment \
            or any(c.isspace() or not c.isprintable() for c in endpoint):
        raise TunerError(f"HF_ENDPOINT must be an http:// or https:// URL, got {shown(endpoint)}")
    return endpoint


_TOKEN_RE = re.compile(r"[\x21-\x7e]{1,4096}")


def hub_token() -> str | None:
    """``HF_TOKEN``, else the token ``hf auth login`` saved; it must be printable ASCII, as an HTTP header needs."""
    token = (os.environ.get("HF_TOKEN") or "").strip()
    if not token:
        try:
            from huggingface_hub import get_token

            token = get_token() or ""
        except Exception:  # a broken token file or OIDC setup must not stop a public read
            return None
    if token and not _TOKEN_RE.fullmatch(token):  # never shown: it is a secret
        raise TunerError("the Hugging Face token (HF_TOKEN or the saved login) holds characters other than "
                         "printable ASCII or is over 4096 characters; an HTTP header cannot carry it")
    return token or None


# --- the header cache ---------------------------------------------------------------------------------------------

def _repo_cache(repo: str, *parts: str) -> Path:
    """``<cache>/hub-headers/<owner>/<name>/<parts…>``: every part checked by its grammar where it came in, and the
    whole path checked to stay inside the cache."""
    check_repo_id(repo)
    return path_under(cache_dir() / CACHE_SUBDIR, repo, *parts, what=f"a cache path for {repo}")


def _header_cache_path(listing: HubListing, path: str) -> Path:
    check_repo_path(path, where=f"the listing of {listing.repo}")
    return _repo_cache(listing.repo, check_commit(listing.commit, where=listing.repo), path + ".json")


def _read_json(path: Path) -> Any:
    """A cache file's JSON (bounded in size and depth: tuner.records), or None when it cannot be read: a miss."""
    try:
        return read_json_file(path)
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


def list_hub_repo(repo: str, revision: str | None = None) -> HubListing:
    """The repo's files and sizes at ``revision`` (default main) and the commit it points to: one API call, or the
    cached listing of that revision when the Hub cannot be reached (or ``HF_HUB_OFFLINE`` is set)."""
    from tuner import hub_api

    check_repo_id(repo)
    endpoint, rev = hub_endpoint(), check_revision(revision or "main")
    ref_file = _repo_cache(repo, "refs", f"{quote(rev, safe='')}.json")
    try:
        if _offline():
            raise hub_api.HubUnreachable("HF_HUB_OFFLINE is set")
        token = hub_token()
        headers = {"User-Agent": f"tuner/{__version__}", **({"Authorization": f"Bearer {token}"} if token else {})}

        async def fetch() -> hub_api.RepoFiles:
            async with hub_api.client() as http:
                return await hub_api.fetch_repo_files(http, endpoint, repo, rev, headers)

        found = hub_api.run(fetch, f"listing {repo} at {endpoint}")
    except hub_api.HubUnreachable as error:
        cached = _cached_listing(repo, rev, ref_file, endpoint)
        if cached is None:
            raise TunerError(f"cannot reach {endpoint} to list {repo} ({error.one_line()}) and it was never listed "
                             "before") from None
        return cached
    listing = HubListing(repo, rev, found.commit, found.files, endpoint)
    with contextlib.suppress(OSError):  # the cache is an optimisation
        write_atomic(_repo_cache(repo, f"{found.commit}.listing.json"),
                     json.dumps({"format": HEADER_CACHE_FORMAT, "files": [list(f) for f in found.files]}))
        write_atomic(ref_file, json.dumps({"commit": found.commit}))
    return listing


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` keeps tuner (and huggingface_hub) off the Hub."""
    return _offline()


def _cached_listing(repo: str, rev: str, ref_file: Path, endpoint: str) -> HubListing | None:
    """The listing cached for ``rev``; None when there is none or it does not pass the listing's own checks."""
    from tuner.hub_api import check_files

    ref = _read_json(ref_file)
    commit = ref.get("commit") if isinstance(ref, dict) else None
    if not commit and is_commit(rev):
        commit = rev
    if not isinstance(commit, str) or not is_commit(commit):
        return None
    data = _read_json(_repo_cache(repo, f"{commit}.listing.json"))
    if not isinstance(data, dict) or data.get("format") != HEADER_CACHE_FORMAT:
        return None
    try:
        files = check_files(data.get("files"), f"the cached listing of {repo}")
    except TunerError:
        return None
    return HubListing(repo, rev, commit, files, endpoint, from_cache=True)


# --- range reads --------------------------------------------------------------------------------------------------

async def read_remote_shard(reader: Any, size_bytes: int, *, shard: int, label: str,
                            first_read: int | None = None) -> tuple[ParsedShard, int]:
    """Parse one remote shard's header from a :class:`tuner.hub_api.RangeReader`, reading only its prefix (never
    past the parser's MAX_HEADER_BYTES); returns it and the bytes fetched."""
    want = min(first_read or REMOTE_FIRST_READ, size_bytes)
    while True:
        buf = await reader.prefix(want)
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
    mostly take one request each), then run the rest concurrently (HEADER_WORKERS at a time), all under one
    deadline (:func:`tuner.hub_api.run`); each header is cached as soon as it is read."""
    from tuner import hub_api

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

        async def read_all() -> None:
            async with hub_api.client() as http:
                slots = asyncio.Semaphore(HEADER_WORKERS)

                async def read(job: _Job, first_read: int | None) -> None:
                    async with slots:
                        reader = hub_api.RangeReader(http, listing.url(job[2]), job[3], headers,
                                                     f"{listing.repo}/{job[2]}")
                        finish(job, *await read_remote_shard(reader, job[3], shard=job[1],
                                                             label=reader.label, first_read=first_read))

                rest = list(todo)
                firsts = [j for j in rest if j[1] == 0]
                hint = None
                if len(firsts) > 1:
                    await read(firsts[0], None)
                    hint = header_size_hint(results[(firsts[0][0], 0)].data_offset)
                    rest = [j for j in rest if j is not firsts[0]]
                tasks = [asyncio.ensure_future(read(job, hint if job[1] == 0 else None)) for job in rest]
                try:
                    await asyncio.gather(*tasks)
                finally:  # the first failure (or Ctrl-C) stops the others at once
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)

        hub_api.run(read_all, f"reading GGUF headers of {listing.repo} from {listing.endpoint}",
                    hint="the headers read so far are cached")
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
    candidates = candidates_from_headers(headers, groups, source="hub", repo=hub.repo, revision=listing.commit,
                                         mmproj=grouped.pick_mmproj())
    return attach_sidecars(candidates, listing, grouped, groups, on_progress)


def attach_sidecars(candidates: Sequence[QuantCandidate], listing: HubListing, grouped: GroupedFiles,
                    groups: Sequence[FileGroup], on_progress: ProgressFn | None = None) -> list[QuantCandidate]:
    """Each candidate with the MTP sidecar of its repo picked for it (:meth:`GroupedFiles.pick_mtp`), whose header is
    read (once per sidecar, cached like the others) to size it; a sidecar that cannot be read, or is another
    model's head, is left out."""
    by_file = {g.files[0]: g for g in groups}
    picks = {c.files[0]: grouped.pick_mtp(by_file[c.files[0]]) for c in candidates if c.files[0] in by_file}
    wanted = sorted({p for p in picks.values() if p is not None})
    if not wanted:
        return list(candidates)
    read: dict[str, GgufHeader] = {}
    for path, size in wanted:
        try:
            read[path] = read_hub_headers(listing, [FileGroup("mtp", (path,), (size,))], on_progress=on_progress)[0][0]
        except TunerError:
            continue
    out = []
    for c in candidates:
        pick = picks.get(c.files[0])
        draft = sidecar_layout(read[pick[0]], c.layout) if pick is not None and pick[0] in read else None
        out.append(replace(c, mtp_sidecar=pick[0], mtp_draft=draft) if pick is not None and draft else c)
    return out


def read_hub_file_header(repo: str, commit: str, path: str, size: int) -> GgufHeader:
    """The header of one (unsplit) file of a Hub repo at ``commit``: cached, or read by range requests."""
    listing = HubListing(repo, commit, check_commit(commit, where=repo), ((path, size),), hub_endpoint())
    return read_hub_headers(listing, [FileGroup(PurePosixPath(path).name, (path,), (size,))])[0][0]


def hub_quant_labels(ref: str) -> list[str]:
    """The quant labels of a Hub repo, from its listing alone (no header is read)."""
    hub = parse_hub_ref(ref)
    return [g.label for g in list_hub_repo(hub.repo, hub.revision).grouped().complete]


# --- file dates ---------------------------------------------------------------------------------------------------

_SNAPSHOT_RE = re.compile(r"(?:^|/)models--(?P<owner>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/"
                          r"(?P<path>.+)$")


def hf_snapshot(path: str | os.PathLike[str]) -> tuple[str, str, str] | None:
    """``(repo, commit, path in repo)`` of a file inside a Hugging Face cache snapshot
    (``…/models--{owner}--{name}/snapshots/{commit}/{path}``, the layout huggingface_hub and llama.cpp's ``-hf``
    share: common/hf-cache.cpp:40-42, 69-79); None for any other path. The path is read as given (its link to the
    blob is not followed)."""
    m = _SNAPSHOT_RE.search(Path(path).expanduser().absolute().as_posix())
    if not m:
        return None
    repo = f"{m.group('owner')}/{m.group('name')}"
    try:
        return check_repo_id(repo), m.group("commit"), check_repo_path(m.group("path"), where=repo)
    except TunerError:
        return None


def hub_file_dates(repo: str, commit: str, paths: Sequence[str]) -> dict[str, datetime | None]:
    """When each of ``paths`` was last committed in ``repo`` as of ``commit`` (the uploader's date of the file): the
    Hub's paths-info, cached per (repo, commit, path) beside the headers since a commit never changes. Offline
    (``HF_HUB_OFFLINE``) only the cache answers; a path neither cached nor answered is None. TunerError
    (:class:`tuner.hub_api.HubUnreachable` when the Hub cannot be reached) for an uncached path it cannot ask."""
    from tuner import hub_api

    check_commit(commit, where=repo)
    out: dict[str, datetime | None] = {}
    todo: list[str] = []
    for p in paths:
        cached = _read_json(_repo_cache(repo, commit, check_repo_path(p, where=repo) + ".date.json"))
        if isinstance(cached, dict) and "date" in cached:
            out[p] = _parse_date(cached["date"])
        else:
            todo.append(p)
    if not todo:
        return out
    if _offline():
        raise hub_api.HubUnreachable("HF_HUB_OFFLINE is set")
    endpoint, token = hub_endpoint(), hub_token()
    headers = {"User-Agent": f"tuner/{__version__}", **({"Authorization": f"Bearer {token}"} if token else {})}

    async def ask() -> dict[str, datetime | None]:
        async with hub_api.client() as http:
            return await hub_api.fetch_paths_dates(http, endpoint, repo, commit, todo, headers)

    found = hub_api.run(ask, f"reading the file dates of {repo} at {endpoint}")
    for p, when in found.items():
        out[p] = when
        with contextlib.suppress(OSError):
            write_atomic(_repo_cache(repo, commit, p + ".date.json"),
                         json.dumps({"date": when.isoformat() if when else None}), durable=False)
    return out


def _parse_date(text: Any) -> datetime | None:
    if not isinstance(text, str):
        return None
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None

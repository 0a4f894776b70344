"""The Hub's HTTP answers, bounded in time and size and validated before tuner uses them: the repo listing and range
reads of file prefixes.

* The listing is ``GET {endpoint}/api/models/{repo}/revision/{rev}?blobs=true`` (the call huggingface_hub's
  ``model_info(files_metadata=True)`` makes), hand-written on httpx because that call reads an answer of any size
  with per-read timeouts only: here the answer is capped at :data:`LISTING_MAX_BYTES` and
  :data:`LISTING_MAX_FILES` entries, every file name and the commit id are checked (:mod:`tuner.untrusted`) and the
  Hub's ``X-Error-Code`` header is read as huggingface_hub's ``hf_raise_for_status`` reads it.
* Every operation runs on asyncio under one overall deadline (:func:`run`, ``TUNER_HUB_DEADLINE_S``, default
  300 s) as well as per-read timeouts, so a server that trickles a byte every few seconds cannot keep tuner waiting,
  and Ctrl-C cancels the reads at once: no worker thread is left waiting on a stuck socket.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, TypeVar
from urllib.parse import quote

import httpx

from tuner.errors import TunerError
from tuner.gguf_file import MAX_HEADER_BYTES, split_name
from tuner.untrusted import check_commit, check_repo_path, shown

T = TypeVar("T")

DEADLINE_ENV = "TUNER_HUB_DEADLINE_S"
DEFAULT_DEADLINE_S = 300.0  # one listing, or all header reads of one command (~40 MB for a 3-quant ladder)
READ_TIMEOUT_S = 30.0  # per connect / read / write
MAX_REDIRECTS = 5  # the Hub redirects a file once, to its CDN
LISTING_MAX_BYTES = 16 << 20  # a listing of 10,000 files with sizes and hashes is ~4 MB (real GGUF repos: ~100)
LISTING_MAX_FILES = 10_000
MAX_FILE_BYTES = 1 << 50  # 1 PiB: the largest GGUF shards are tens of GB


class HubUnreachable(TunerError):
    """The Hub could not be reached or did not answer in time: a cached listing may stand in."""


def deadline_s() -> float:
    """The overall deadline of one Hub operation, from ``TUNER_HUB_DEADLINE_S`` (seconds) or the default."""
    text = os.environ.get(DEADLINE_ENV, "").strip()
    if not text:
        return DEFAULT_DEADLINE_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise TunerError(f"{DEADLINE_ENV} must be a positive number of seconds, got {shown(text)}")
    return value


def client() -> httpx.AsyncClient:
    """The HTTP client of one operation: redirects followed (at most MAX_REDIRECTS), per-read timeouts."""
    return httpx.AsyncClient(follow_redirects=True, max_redirects=MAX_REDIRECTS,
                             timeout=httpx.Timeout(READ_TIMEOUT_S, connect=min(READ_TIMEOUT_S, 10.0)))


def run(operation: Callable[[], Awaitable[T]], what: str, *, hint: str = "") -> T:
    """Run one Hub operation to its end or its deadline; Ctrl-C cancels it (asyncio closes the sockets)."""
    limit = deadline_s()

    async def bounded() -> T:
        try:
            return await asyncio.wait_for(operation(), limit)
        except asyncio.TimeoutError:
            raise HubUnreachable(f"{what} took longer than {limit:g} s (set {DEADLINE_ENV} to wait longer"
                                 + (f"; {hint}" if hint else "") + ")") from None

    return asyncio.run(bounded())


def transport_error(error: httpx.HTTPError, what: str) -> TunerError:
    """One line for an httpx failure: unreachable (a cached answer may do) or a broken answer."""
    reason = " ".join(str(error).split()) or type(error).__name__
    if isinstance(error, httpx.TooManyRedirects):
        return TunerError(f"{what}: the Hub redirected more than {MAX_REDIRECTS} times")
    if isinstance(error, httpx.TransportError):
        return HubUnreachable(f"{what}: {reason}")
    return TunerError(f"{what}: {reason}")


# --- the listing -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RepoFiles:
    """A validated listing: the commit it is at and ``(path, size)`` of every file, sorted by path."""

    commit: str
    files: tuple[tuple[str, int], ...]


def check_files(entries: Any, where: str) -> tuple[tuple[str, int], ...]:
    """``(path, size)`` pairs from a listing (or its cache), each path checked as a repo path (and as a split name
    when it is one), each size a whole number of bytes; the list bounded by LISTING_MAX_FILES."""
    if not isinstance(entries, list):
        raise TunerError(f"{where}: the file list is {type(entries).__name__}, not a list")
    if len(entries) > LISTING_MAX_FILES:
        raise TunerError(f"{where}: {len(entries)} files, more than the limit of {LISTING_MAX_FILES}")
    files: dict[str, int] = {}
    for entry in entries:
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            raise TunerError(f"{where}: a file entry is {shown(entry)}, not (path, size)")
        path, size = entry
        check_repo_path(path, where=where)
        if type(size) is not int or not 0 <= size <= MAX_FILE_BYTES:
            raise TunerError(f"{where}: file {shown(path)} has size {shown(size)}, not 0..{MAX_FILE_BYTES} bytes")
        if path in files:
            raise TunerError(f"{where}: file {shown(path)} is listed twice")
        if path.lower().endswith(".gguf"):
            try:
                split_name(path)
            except TunerError as exc:
                raise TunerError(f"{where}: {exc}") from None
        files[path] = size
    return tuple(sorted(files.items()))


def _sibling(entry: Any, where: str) -> tuple[Any, Any]:
    if not isinstance(entry, dict):
        raise TunerError(f"{where}: a sibling is {shown(entry)}, not an object")
    size = entry.get("size")
    if size is None:
        lfs = entry.get("lfs")
        size = lfs.get("size", 0) if isinstance(lfs, dict) else 0
    return entry.get("rfilename"), size


def repo_files_from_json(data: Any, where: str) -> RepoFiles:
    """The commit and files of a model-info answer (``sha``, ``siblings[].rfilename/size/lfs.size``), validated."""
    if not isinstance(data, dict):
        raise TunerError(f"{where}: the Hub answered {type(data).__name__}, not a repo listing")
    commit = check_commit(data.get("sha"), where=f"{where}: the Hub's commit")
    siblings = data.get("siblings")
    if not isinstance(siblings, list):
        raise TunerError(f"{where}: the Hub's 'siblings' is {shown(siblings, 40)}, not a list of files")
    if len(siblings) > LISTING_MAX_FILES:
        raise TunerError(f"{where}: {len(siblings)} files, more than the limit of {LISTING_MAX_FILES}")
    return RepoFiles(commit, check_files([_sibling(s, where) for s in siblings], where))


async def _read_capped(response: httpx.Response, limit: int, what: str) -> bytes:
    declared = response.headers.get("Content-Length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TunerError(f"{what}: the answer is {int(declared)} bytes, more than the limit of {limit}")
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) > limit:
            raise TunerError(f"{what}: the answer is more than the limit of {limit} bytes")
    return bytes(body)


async def fetch_repo_files(http: httpx.AsyncClient, endpoint: str, repo: str, revision: str,
                           headers: dict[str, str]) -> RepoFiles:
    """List ``repo`` at ``revision``; a one-line TunerError for every answer that is not a valid listing."""
    what = f"listing {repo}"
    url = f"{endpoint}/api/models/{repo}/revision/{quote(revision, safe='')}"
    try:
        async with http.stream("GET", url, params={"blobs": "true"}, headers=headers) as r:
            if r.status_code != 200:
                raise _listing_status_error(r, repo, revision, endpoint)
            body = await _read_capped(r, LISTING_MAX_BYTES, what)
            content_type = r.headers.get("Content-Type", "")
    except httpx.HTTPError as error:
        raise transport_error(error, what) from None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        kind = content_type.split(";")[0].strip() or "no content type"
        raise TunerError(f"the Hub's answer {what} is not JSON ({kind}, {len(body)} bytes)") from None
    return repo_files_from_json(data, f"the Hub's listing of {repo}")


def _listing_status_error(r: httpx.Response, repo: str, revision: str, endpoint: str) -> TunerError:
    code = r.headers.get("X-Error-Code", "")
    message = r.headers.get("X-Error-Message", "")
    if code == "GatedRepo":
        return TunerError(f"{repo} is gated: accept its terms on the Hub and set HF_TOKEN")
    if code == "RevisionNotFound":
        return TunerError(f"Hugging Face repo {repo} has no revision {shown(revision)}")
    if code == "RepoNotFound" or r.status_code == 404 or (
            r.status_code == 401 and message != "Invalid credentials in Authorization header"):
        return TunerError(f"Hugging Face repo {repo} not found at {endpoint} (a private repo needs HF_TOKEN)")
    if r.status_code == 401:
        return TunerError(f"the Hub refused the token listing {repo} (HTTP 401: check HF_TOKEN)")
    return TunerError(f"the Hub answered HTTP {r.status_code} listing {repo}")


# --- range reads -------------------------------------------------------------------------------------------------

class RangeReader:
    """Prefixes of one remote file, fetched incrementally with ``Range`` requests, never past MAX_HEADER_BYTES."""

    def __init__(self, http: httpx.AsyncClient, url: str, size_bytes: int, headers: dict[str, str],
                 label: str) -> None:
        self.http, self.url, self.size, self.headers, self.label = http, url, size_bytes, headers, label
        self.buf = bytearray()

    async def prefix(self, n: int) -> bytes:
        n = min(n, self.size)
        if n > MAX_HEADER_BYTES:  # the parser never asks for it: a last guard on what is requested
            raise TunerError(f"{self.label}: refusing to read {n} bytes of header (limit {MAX_HEADER_BYTES})")
        if len(self.buf) < n:
            await self._fetch(len(self.buf), n - 1)
        return bytes(self.buf[:n])

    async def _fetch(self, start: int, end: int) -> None:
        want = end - start + 1
        headers = {**self.headers, "Range": f"bytes={start}-{end}"}
        try:
            async with self.http.stream("GET", self.url, headers=headers) as r:
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
                async for chunk in r.aiter_bytes():
                    if skip:
                        cut = min(skip, len(chunk))
                        chunk, skip = chunk[cut:], skip - cut
                    got += chunk
                    if len(got) >= want:
                        break
            final = str(r.url)
        except httpx.HTTPError as error:
            raise transport_error(error, f"reading {self.label}") from None
        if final != self.url:  # the Hub redirected to its CDN: go there directly for the next range
            if httpx.URL(final).host != httpx.URL(self.url).host:
                self.headers = {k: v for k, v in self.headers.items() if k.lower() != "authorization"}
            self.url = final
        if len(got) < want and start + len(got) < self.size:
            raise TunerError(f"{self.label}: the Hub sent {len(got)} of {want} bytes asked for")
        self.buf += got[:want]



# --- small files and file dates -----------------------------------------------------------------------------------

SMALL_FILE_MAX_BYTES = 16 << 20  # a tokenizer_config.json is tens of kB; a chat template a few
PATHS_INFO_MAX_BYTES = 4 << 20


async def fetch_small_file(http: httpx.AsyncClient, url: str, headers: dict[str, str], what: str,
                           limit: int = SMALL_FILE_MAX_BYTES) -> bytes:
    """The whole of a small repo file (``{endpoint}/{repo}/resolve/{commit}/{path}``), at most ``limit`` bytes.

    Hand-written rather than ``hf_hub_download``: that one has no size limit and, without a network, retries for
    about 23 s before it gives up; here the caller has already listed the repo, so the file is known to exist."""
    try:
        async with http.stream("GET", url, headers=headers) as r:
            if r.status_code in (401, 403):
                raise TunerError(f"access denied reading {what} (HTTP {r.status_code}; set HF_TOKEN)")
            if r.status_code == 404:
                raise TunerError(f"{what} not found on the Hub (HTTP 404)")
            if r.status_code != 200:
                raise TunerError(f"the Hub answered HTTP {r.status_code} reading {what}")
            return await _read_capped(r, limit, what)
    except httpx.HTTPError as error:
        raise transport_error(error, f"reading {what}") from None


def _commit_date(entry: dict[str, Any], where: str) -> datetime | None:
    last = entry.get("lastCommit")
    if last is None:
        return None
    date = last.get("date") if isinstance(last, dict) else None
    if not isinstance(date, str) or len(date) > 64:
        raise TunerError(f"{where}: a last commit date is {shown(date, 40)}, not an ISO date")
    try:
        when = datetime.fromisoformat(date.replace("Z", "+00:00"))
    except ValueError:
        raise TunerError(f"{where}: a last commit date is {shown(date, 40)}, not an ISO date") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)


def paths_dates_from_json(data: Any, paths: list[str], where: str) -> dict[str, datetime | None]:
    """The last-commit date of each asked path from a paths-info answer (``[{"path", "type", "lastCommit": {"id",
    "title", "date"}}, …]``, what ``HfApi.get_paths_info(expand=True)`` reads); a path the answer lacks is None."""
    if not isinstance(data, list) or len(data) > LISTING_MAX_FILES:
        raise TunerError(f"{where}: the Hub answered {type(data).__name__}, not a list of paths")
    found: dict[str, datetime | None] = dict.fromkeys(paths)
    for entry in data:
        if not isinstance(entry, dict):
            raise TunerError(f"{where}: a path entry is {shown(entry, 40)}, not an object")
        path = entry.get("path")
        if path in found:
            found[path] = _commit_date(entry, where)
    return found


async def fetch_paths_dates(http: httpx.AsyncClient, endpoint: str, repo: str, revision: str, paths: list[str],
                            headers: dict[str, str]) -> dict[str, datetime | None]:
    """The date of the last commit that touched each of ``paths`` at ``revision``: one ``POST
    {endpoint}/api/models/{repo}/paths-info/{revision}`` with ``expand=true`` (the call ``HfApi.get_paths_info``
    makes), its answer bounded and validated like the listing's."""
    what = f"the file dates of {repo}"
    for p in paths:
        check_repo_path(p, where=what)
    url = f"{endpoint}/api/models/{repo}/paths-info/{quote(revision, safe='')}"
    try:
        async with http.stream("POST", url, data={"paths": paths, "expand": "true"}, headers=headers) as r:
            if r.status_code != 200:
                raise _listing_status_error(r, repo, revision, endpoint)
            body = await _read_capped(r, PATHS_INFO_MAX_BYTES, what)
    except httpx.HTTPError as error:
        raise transport_error(error, what) from None
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise TunerError(f"the Hub's answer with {what} is not JSON ({len(body)} bytes)") from None
    return paths_dates_from_json(data, paths, f"the Hub's answer with {what}")

"""A small Hugging Face Hub on 127.0.0.1 for tests: real HTTP, real GGUF files, byte counters.

It answers what ``huggingface_hub`` and :mod:`tuner.remote` call:

* ``GET /api/models/{repo}[/revision/{rev}]`` (model info; ``?blobs=true`` adds sizes) and
  ``GET /api/models/{repo}/tree/{rev}[/{path}]`` (``?expand=true`` adds each file's ``lastCommit``), with the Hub's
  ``X-Error-Code`` headers on 404;
* ``POST /api/models/{repo}/paths-info/{rev}`` (form ``paths=…&paths=…&expand=true``, what
  ``HfApi.get_paths_info`` sends): the entries of the paths that exist, with ``lastCommit`` when expanded;
* ``GET|HEAD /{repo}/resolve/{rev}/{path}``: a 302 to a CDN-like ``/cdn-lfs/...`` URL for ``.gguf`` files (as the
  Hub redirects LFS files), served directly otherwise;
* ``GET|HEAD /cdn-lfs/{repo}/{commit}/{path}``: the file, honouring ``Range: bytes=a-b`` with 206 and
  ``Content-Range`` (416 past the end).

Repos are folders ``root/<owner>/<name>/``; a repo's commit is a hash of its file names, sizes and modification
times (a file replaced in place with the same size is a new commit, as on the Hub). A file's last commit is dated by
its modification time (set it with ``os.utime``). A small (non-LFS) file's ETag and ``oid`` are the sha1 of its
content, so ``hf_hub_download`` keeps each file apart (its blobs are stored by ETag). Every request is
recorded (method, path, headers) and every body byte sent is counted per ``owner/name/path``. A repo listed in
``tokens`` answers 401 unless the request carries ``Authorization: Bearer <token>``; ``ignore_range`` makes it send
whole files (200) whatever the ``Range`` header says.

A repo listed in ``misbehave`` answers as a hostile or broken Hub would (:class:`Misbehave`): a patched or replaced
listing (an absolute ``sha``, ``siblings`` that is no list, HTML), a redirect loop, an endless listing, answers
trickled one byte at a time, or a request accepted and never answered.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import socket
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

import numpy as np
from gguf import GGUFWriter

from tuner.cards import iter_recipe_types, load_card
from tuner.synth import (
    SynthSpec,
    hparams_metadata,
    real_vocab_overrides,
    spec_from_card,
    tensor_plan,
    vocabulary,
    write_synthetic_gguf,
)

_CHUNK = 64 * 1024


@dataclass(frozen=True)
class Misbehave:
    """How the fake Hub answers one repo badly."""

    listing_patch: dict[str, Any] = field(default_factory=dict)  # merged into the model-info JSON ({"sha": ...})
    listing_body: bytes | None = None  # the model-info answer's whole body instead (HTML, broken JSON …)
    listing_type: str = "application/json"
    listing_status: int = 200
    listing_headers: dict[str, str] = field(default_factory=dict)  # e.g. X-Error-Code with a non-200 status
    sizes: dict[str, int] = field(default_factory=dict)  # file sizes the listing claims instead of the real ones
    redirect_loop: bool = False  # the model-info call answers 302 to itself, forever
    endless_listing: bool = False  # a JSON listing whose siblings never end (no Content-Length)
    slow: str | None = None  # "listing" or "files": send its bytes one at a time, slow_s apart
    slow_s: float = 5.0
    stall: str | None = None  # "listing" or "files": take the request, then answer nothing until the server stops;
    # "downloads": so for whole-file downloads only (a GET without a Range end), header range reads still answered
_RANGE_RE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass(frozen=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased (HTTP header names are case-insensitive)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())


@dataclass
class FakeHub:
    """The server; use as a context manager. ``endpoint`` is what HF_ENDPOINT should be set to."""

    root: Path
    tokens: dict[str, str] = field(default_factory=dict)  # repo -> the bearer token it requires
    misbehave: dict[str, Misbehave] = field(default_factory=dict)  # repo -> how it answers badly
    ignore_range: bool = False  # answer every file GET with the whole file (200), as a Range-unaware server
    bytes_sent: dict[str, int] = field(default_factory=dict)
    requests: list[Seen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()  # releases stalled and trickling handlers

    # --- lifecycle ------------------------------------------------------------------------------------------------
    def __enter__(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        assert self._server is not None and self._thread is not None
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        with self._lock:  # kept-alive connections would go on answering: cut them, as a dead host would
            for conn in self._connections:
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            self._connections.clear()
        self._thread.join(timeout=5)

    @property
    def endpoint(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- counters -------------------------------------------------------------------------------------------------
    def reset_counters(self) -> None:
        with self._lock:
            self.bytes_sent.clear()
            self.requests.clear()

    def total_bytes_sent(self) -> int:
        with self._lock:
            return sum(self.bytes_sent.values())

    def _count(self, key: str, n: int) -> None:
        with self._lock:
            self.bytes_sent[key] = self.bytes_sent.get(key, 0) + n

    def _record(self, seen: Seen) -> None:
        with self._lock:
            self.requests.append(seen)

    # --- repos ----------------------------------------------------------------------------------------------------
    def repo_dir(self, repo: str) -> Path | None:
        d = self.root / repo
        return d if repo.count("/") == 1 and d.is_dir() else None

    def files(self, repo: str) -> list[tuple[str, int]]:
        d = self.repo_dir(repo)
        assert d is not None
        return sorted((p.relative_to(d).as_posix(), p.stat().st_size) for p in d.rglob("*") if p.is_file())

    def commit(self, repo: str) -> str:
        d = self.repo_dir(repo)
        assert d is not None
        stamped = [(name, size, (d / name).stat().st_mtime_ns) for name, size in self.files(repo)]
        return hashlib.sha1(json.dumps(stamped).encode()).hexdigest()

    def last_commit(self, repo: str, name: str) -> dict[str, str]:
        """The Hub's ``lastCommit`` of a file: dated by its modification time."""
        st = (self.root / repo / name).stat()
        when = datetime.fromtimestamp(st.st_mtime, timezone.utc)
        return {"id": hashlib.sha1(f"{repo}/{name}:{st.st_mtime_ns}".encode()).hexdigest(),
                "title": f"Upload {name}", "date": when.strftime("%Y-%m-%dT%H:%M:%S.000Z")}

    def oid(self, repo: str, name: str) -> str:
        """A file's git-blob-like id: the sha1 of a small file's content (of its name and size for a GGUF, which
        may be a sparse file of many GB)."""
        file = self.root / repo / name
        if name.endswith(".gguf"):
            return hashlib.sha1(f"{name}:{file.stat().st_size}".encode()).hexdigest()
        return hashlib.sha1(file.read_bytes()).hexdigest()

    def entry(self, repo: str, name: str, size: int, expand: bool) -> dict[str, Any]:
        """A tree / paths-info entry of a file."""
        item: dict[str, Any] = {"type": "file", "oid": self.oid(repo, name), "size": size, "path": name}
        if name.endswith(".gguf"):
            item["lfs"] = {"oid": "0" * 64, "size": size, "pointerSize": 134}
        if expand:
            item["lastCommit"] = self.last_commit(repo, name)
        return item


def _lfs(size: int) -> dict[str, Any]:
    return {"size": size, "sha256": "0" * 64, "pointerSize": 134}


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        with self.fake._lock:
            self.fake._connections.add(self.connection)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        with self.fake._lock:
            self.fake._connections.discard(self.connection)

    # --- plumbing -------------------------------------------------------------------------------------------------
    def _send(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _json(self, status: int, data: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(data).encode(), headers)

    def _error(self, status: int, code: str, message: str) -> None:
        self._json(status, {"error": message}, {"X-Error-Code": code, "X-Error-Message": message})

    def _authorized(self, repo: str) -> bool:
        need = self.fake.tokens.get(repo)
        if need is None or self.headers.get("Authorization") == f"Bearer {need}":
            return True
        self._error(401, "RepoNotFound", "Invalid credentials in Authorization header")
        return False

    def do_HEAD(self) -> None:
        self.do_GET()

    def do_POST(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.fake._record(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        length = int(self.headers.get("Content-Length") or 0)
        form = parse_qs(self.rfile.read(length).decode("utf-8", errors="replace")) if length else {}
        m = re.match(r"^/api/models/([^/]+/[^/]+)/paths-info/(.+)$", path)
        try:
            if not m:
                self._error(404, "EntryNotFound", "unknown API path")
                return
            repo, rev = m.groups()
            if self.fake.repo_dir(repo) is None:
                self._error(404, "RepoNotFound", "Repository not found")
                return
            if not self._authorized(repo):
                return
            if rev not in ("main", self.fake.commit(repo)):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return
            expand = form.get("expand", ["false"])[0].lower() == "true"
            files = dict(self.fake.files(repo))
            self._json(200, [self.fake.entry(repo, p, files[p], expand) for p in form.get("paths", []) if p in files])
        except (BrokenPipeError, ConnectionResetError):
            pass

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        path = unquote(url.path)
        self.fake._record(Seen(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}))
        try:
            if path.startswith("/api/models/"):
                self._api(path[len("/api/models/"):], parse_qs(url.query))
            elif path.startswith("/cdn-lfs/"):
                self._cdn(path[len("/cdn-lfs/"):])
            elif "/resolve/" in path:
                self._resolve(path.lstrip("/"))
            else:
                self._error(404, "EntryNotFound", "not found")
        except (BrokenPipeError, ConnectionResetError):
            pass

    # --- API ------------------------------------------------------------------------------------------------------
    def _api(self, rest: str, query: dict[str, list[str]]) -> None:
        parts = rest.split("/")
        repo = "/".join(parts[:2])
        if self.fake.repo_dir(repo) is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        if not self._authorized(repo):
            return
        commit = self.fake.commit(repo)
        tail = parts[2:]
        bad = self.fake.misbehave.get(repo)
        if bad is not None and (not tail or tail[0] == "revision") and self._misbehave_listing(bad, commit):
            return
        if not tail or tail[0] == "revision":
            rev = "/".join(tail[1:]) if tail else "main"
            if rev not in ("main", commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return
            blobs = query.get("blobs", ["false"])[0].lower() == "true"
            siblings = []
            for name, size in self.fake.files(repo):
                size = bad.sizes.get(name, size) if bad is not None else size
                entry: dict[str, Any] = {"rfilename": name}
                if blobs:
                    entry.update({"size": size, "blobId": hashlib.sha1(name.encode()).hexdigest()})
                    if name.endswith(".gguf"):
                        entry["lfs"] = _lfs(size)
                siblings.append(entry)
            info = {"_id": hashlib.md5(repo.encode()).hexdigest()[:24], "id": repo, "modelId": repo,
                    "sha": commit, "private": repo in self.fake.tokens, "gated": False, "disabled": False,
                    "tags": ["gguf"], "siblings": siblings}
            if bad is not None:
                info.update(bad.listing_patch)
                if bad.slow == "listing":
                    self._trickle(200, json.dumps(info).encode(), bad.slow_s, None)
                    return
            self._json(200, info)
            return
        if tail[0] == "tree" and len(tail) >= 2:
            rev, sub = tail[1], "/".join(tail[2:])
            if rev not in ("main", commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            expand = query.get("expand", ["false"])[0].lower() == "true"
            out = []
            folders: set[str] = set()
            for name, size in self.fake.files(repo):
                if sub and not name.startswith(sub + "/"):
                    continue
                rel = name[len(sub) + 1:] if sub else name
                if "/" in rel and not recursive:
                    folders.add((sub + "/" if sub else "") + rel.split("/")[0])
                    continue
                out.append(self.fake.entry(repo, name, size, expand))
            out += [{"type": "directory", "oid": hashlib.sha1(f.encode()).hexdigest(), "size": 0, "path": f}
                    for f in sorted(folders)]
            self._json(200, out)
            return
        self._error(404, "EntryNotFound", "unknown API path")

    # --- misbehaving -----------------------------------------------------------------------------------------------
    def _misbehave_listing(self, bad: Misbehave, commit: str) -> bool:
        """Answer the model-info call as ``bad`` says; False to answer it normally (patched later)."""
        if bad.stall == "listing":
            self.fake._stopping.wait()
            return True
        if bad.redirect_loop:
            self._send(302, b"", {"Location": self.path})
            return True
        if bad.endless_listing:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            self.wfile.write(f'{{"sha": "{commit}", "siblings": ['.encode())
            entry = b'{"rfilename": "filler.txt", "size": 1},' * 1024
            while not self.fake._stopping.is_set():
                self.wfile.write(entry)
            return True
        if bad.listing_body is not None:
            if bad.slow == "listing":
                self._trickle(bad.listing_status, bad.listing_body, bad.slow_s, bad.listing_type)
            else:
                self._send(bad.listing_status, bad.listing_body, bad.listing_headers, content_type=bad.listing_type)
            return True
        return False

    def _trickle(self, status: int, body: bytes, every_s: float, content_type: str | None) -> None:
        """``body`` one byte at a time, ``every_s`` apart (a Content-Length that is honest, a pace that is not)."""
        self.send_response(status)
        self.send_header("Content-Type", content_type or "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        for i in range(len(body)):
            self.wfile.write(body[i:i + 1])
            self.wfile.flush()
            if self.fake._stopping.wait(every_s):
                return

    # --- files ----------------------------------------------------------------------------------------------------
    def _resolve(self, rest: str) -> None:
        m = re.match(r"^([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", rest)
        if not m or self.fake.repo_dir(m.group(1)) is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return
        repo, rev, name = m.groups()
        if not self._authorized(repo):
            return
        bad = self.fake.misbehave.get(repo)
        if bad is not None and bad.stall == "files":
            self.fake._stopping.wait()
            return
        commit = self.fake.commit(repo)
        if rev not in ("main", commit):
            self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        file = self.fake.root / repo / name
        if not file.is_file():
            self._error(404, "EntryNotFound", f"{name} does not exist on {rev}")
            return
        size = file.stat().st_size
        common = {"X-Repo-Commit": commit, "ETag": f'"{self.fake.oid(repo, name)}"', "Accept-Ranges": "bytes"}
        if name.endswith(".gguf"):  # LFS: redirect to the CDN, as the Hub does
            # The CDN has another host name (the Hub's is cas-bridge.xethub.hf.co): huggingface_hub treats a
            # same-host redirect differently. Each file has its own etag (the Hub's is the content's sha256; a
            # hash of the name and size is as unique here without reading sparse 20 GB files).
            port = self.server.server_address[1]
            location = f"http://localhost:{port}/cdn-lfs/{repo}/{commit}/{quote(name)}?X-Amz-Signature=fake"
            etag = hashlib.sha256(f"{repo}/{name}:{size}".encode()).hexdigest()
            self._send(302, b"", {**common, "Location": location, "X-Linked-Size": str(size),
                                  "X-Linked-Etag": f'"{etag}"'})
            return
        self._serve_file(repo, name, file, common)

    def _cdn(self, rest: str) -> None:
        m = re.match(r"^([^/]+/[^/]+)/([0-9a-f]{40})/(.+)$", rest)
        if not m:
            self._error(404, "EntryNotFound", "bad CDN path")
            return
        repo, _commit, name = m.groups()
        file = self.fake.root / repo / name
        if self.fake.repo_dir(repo) is None or not file.is_file():
            self._error(404, "EntryNotFound", "no such object")
            return
        self._serve_file(repo, name, file, {"Accept-Ranges": "bytes"})

    def _serve_file(self, repo: str, name: str, file: Path, headers: dict[str, str]) -> None:
        bad = self.fake.misbehave.get(repo)
        spec = self.headers.get("Range") or ""
        if bad is not None and bad.stall == "downloads" and self.command == "GET" \
                and not re.match(r"^bytes=\d+-\d+$", spec.strip()):
            self.fake._stopping.wait()
            return
        size = file.stat().st_size
        start, end, status = 0, size - 1, 200
        spec = None if self.fake.ignore_range else self.headers.get("Range")
        if spec:
            m = _RANGE_RE.match(spec.strip())
            if not m:
                self._send(416, b"", {"Content-Range": f"bytes */{size}"})
                return
            start = int(m.group(1))
            end = min(int(m.group(2)) if m.group(2) else size - 1, size - 1)
            if start >= size or start > end:
                self._send(416, b"", {"Content-Range": f"bytes */{size}"})
                return
            status = 206
            headers = {**headers, "Content-Range": f"bytes {start}-{end}/{size}"}
        length = end - start + 1
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        key = f"{repo}/{name}"
        trickle = bad.slow_s if bad is not None and bad.slow == "files" else 0.0
        with open(file, "rb") as fh:
            fh.seek(start)
            left = length
            while left:
                if trickle and self.fake._stopping.wait(trickle):
                    return
                chunk = fh.read(1 if trickle else min(_CHUNK, left))
                if not chunk:
                    break
                self.wfile.write(chunk)
                self.fake._count(key, len(chunk))
                left -= len(chunk)


# --- test repos ---------------------------------------------------------------------------------------------------

# A small qwen35moe whose every row is a whole number of 256-blocks, so every quant type fits.
LADDER_SPEC = SynthSpec(
    name="tuner-hub-ladder", n_layer=4, n_embd=256, n_head=4, n_head_kv=2, head_dim=64, n_expert=32,
    n_expert_used=4, n_ff_exp=256, n_ff_shexp=256, ssm_d_state=32, ssm_n_group=2, ssm_dt_rank=8,
)
# quant label -> (experts, other matrices, token_embd, output) types of the sparse quants
LADDER_TYPES: dict[str, tuple[str, str, str, str]] = {
    "Q8_0": ("q8_0", "q8_0", "q8_0", "q8_0"),
    "Q6_K": ("q6_K", "q6_K", "q6_K", "q6_K"),
    "UD-Q4_K_XL": ("q4_K", "q8_0", "q4_K", "q6_K"),
    "Q4_K_M": ("q4_K", "q4_K", "q4_K", "q6_K"),
    "Q2_K": ("q2_K", "q2_K", "q2_K", "q6_K"),
}


def write_ladder(repo_dir: Path, stem: str = "Tiny-A1B", *, split_label: str = "F16", n_shards: int = 3) -> None:
    """A repo of quants of LADDER_SPEC: sparse single files for LADDER_TYPES, one real (random f16) model split
    into ``n_shards`` under ``<split_label>/``, an mmproj file, a README and an imatrix file to ignore."""
    repo_dir.mkdir(parents=True, exist_ok=True)
    for label, (experts, matrix, embd, output) in LADDER_TYPES.items():
        spec = replace(LADDER_SPEC, fill="zeros",
                       types={"experts": experts, "matrix": matrix, "embd": embd, "output": output})
        write_synthetic_gguf(repo_dir / f"{stem}-{label}.gguf", spec)
    split = replace(LADDER_SPEC, fill="random",
                    types={"experts": "f16", "matrix": "f16", "embd": "f16", "output": "f16"})
    n_tensors = len(_plan_names(split))
    write_synthetic_gguf(repo_dir / split_label / f"{stem}-{split_label}.gguf", split,
                         split_max_tensors=-(-n_tensors // n_shards))
    write_mmproj(repo_dir / "mmproj-F16.gguf")
    write_mmproj(repo_dir / "mmproj-BF16.gguf")
    (repo_dir / "README.md").write_text("# tiny ladder\n", encoding="utf-8")
    (repo_dir / "imatrix_unsloth.gguf").write_bytes(b"GGUF")


def write_card_quants(repo_dir: Path, card_key: str, quants: Sequence[str]) -> list[Path]:
    """Sparse GGUFs of a built-in card's quants: real shapes, the types of the card's recipes and a tokenizer of the
    real length, so each header is as long as on the Hub (about 13 MB for Qwen3.5); ``{name}-{quant}.gguf``."""
    card = load_card(card_key)
    spec = replace(spec_from_card(card), **real_vocab_overrides())
    paths: list[Path] = []
    for quant in quants:
        types = {name: t for name, _cls, t in iter_recipe_types(card, quant)}
        paths += write_synthetic_gguf(repo_dir / f"{card.name}-{quant}.gguf", spec,
                                      type_for=lambda name, _role, types=types: types[name])
    return paths


def _plan_names(spec: SynthSpec) -> list[str]:
    return [n for n, _, _ in tensor_plan(spec, len(vocabulary(spec)[0]))]


def write_mmproj(path: Path) -> None:
    """A vision-projector-like GGUF (arch clip, one f16 tensor)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = GGUFWriter(path, "clip")
    writer.add_tensor("mm.0.weight", np.zeros((64, 64), dtype=np.float16))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_tiny_card(catalog: Path, *, key: str, repo: str, stem: str, spec: SynthSpec,
                    mixes: dict[str, str]) -> None:
    """A catalog folder (for ``TUNER_CATALOG_DIR``): the shipped catalogs plus a card ``key`` for ``spec``'s model
    (its hyperparameters as the card's GGUF values), whose default repo ``repo`` names files ``{stem}-{quant}.gguf``
    and records ``mixes`` (quant -> recipe or mix); ladder: the quants of ``mixes``."""
    import shutil

    import yaml

    shipped = Path(__file__).resolve().parent.parent / "profiles"
    (catalog / "models").mkdir(parents=True, exist_ok=True)
    shutil.copy(shipped / "gpus.yaml", catalog / "gpus.yaml")
    for f in (shipped / "models").glob("*.yaml"):
        shutil.copy(f, catalog / "models" / f.name)
    prefix = f"{spec.arch}."
    gguf = {k.removeprefix(prefix): v for k, v in hparams_metadata(spec).items() if k.startswith(prefix)}
    card = {
        "key": key, "name": spec.name, "arch": spec.arch, "vocab_size": len(vocabulary(spec)[0]),
        "tie_embeddings": spec.tie_embeddings, "mtp_layers": 0, "gguf": gguf, "header_bytes": 200_000,
        "default_repo": repo, "repos": [{"repo": repo, "file": f"{stem}-{{quant}}.gguf", "mtp": False,
                                         "mixes": dict(mixes)}],
        "quants": list(mixes), "quality_order": list(mixes), "known_sizes": [],
        "sampling_presets": {"default": {"temp": 0.7, "top_k": 20}}, "default_preset": "default", "notes": [],
    }
    (catalog / "models" / f"{key}.yaml").write_text(yaml.safe_dump(card, sort_keys=False), encoding="utf-8")

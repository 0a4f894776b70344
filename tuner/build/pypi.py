"""The ``llama-cpp-python`` sdist (it vendors llama.cpp), from pip's configured package index.

The index is ``PIP_INDEX_URL``, else ``pip config``'s ``index-url``, else PyPI (with ``PIP_CERT`` / ``cert`` as the
CA bundle). The sdist is found through the index's simple API (PEP 691 JSON, or PEP 503 HTML), downloaded with
httpx and checked against the index's sha256 and, for versions we pin, :data:`KNOWN_SDIST_SHA256`. Only if that
fails does it fall back to ``python -m pip download --no-deps --no-binary :all:``, which also builds the sdist's
metadata and so takes several times longer.

Hand-written: pip has no Python API (``pip download`` is the slow path this avoids), and a simple-index client
library (pypi-simple) would be a new dependency for 20 lines of page parsing, with pip's configuration still ours.
"""

from __future__ import annotations

import hashlib
import html
import json
import os
import re
import ssl
import subprocess
import sys
from pathlib import Path
from urllib.parse import urljoin

import httpx

from tuner.build.steps import ProgressFn, condense_output, report, run_logged
from tuner.errors import TunerError

PYPI_PROJECT = "llama-cpp-python"
#: sha256 of sdists we pin; anything else is checked against the index's own hash only.
KNOWN_SDIST_SHA256 = {
    "0.3.36": "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e",
}


class IntegrityError(TunerError):
    """A download whose hash is not the expected one: never retried another way."""


def sdist_filenames(version: str) -> tuple[str, ...]:
    return (f"llama_cpp_python-{version}.tar.gz", f"llama-cpp-python-{version}.tar.gz")


def find_sdist_in_index(page: str, content_type: str, page_url: str, version: str) -> tuple[str, str | None]:
    """The sdist's absolute URL and sha256 (None if the index gives none) from a PEP 691 (JSON) or PEP 503
    (HTML) simple-index page."""
    wanted = sdist_filenames(version)
    if "json" in content_type:
        for entry in json.loads(page).get("files", []):
            if entry.get("filename") in wanted and not entry.get("yanked"):
                return urljoin(page_url, entry["url"]), entry.get("hashes", {}).get("sha256")
    else:
        for href in re.findall(r"""<a\s[^>]*?href=["']([^"']+)["']""", page, re.IGNORECASE):
            url = html.unescape(href)
            name = url.split("#", 1)[0].rsplit("/", 1)[-1]
            if name in wanted:
                fragment = url.partition("#")[2]
                sha = fragment[len("sha256=") :] if fragment.startswith("sha256=") else None
                return urljoin(page_url, url.split("#", 1)[0]), sha
    raise TunerError(f"the package index has no {PYPI_PROJECT} {version} sdist")


def pip_setting(config_list: str, name: str) -> str | None:
    """A setting from ``pip config list`` output, pip's precedence: env, then download, then global."""
    values: dict[str, str] = {}
    for line in config_list.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip().strip("'\"")
    for section in (":env:", "download", "global"):
        if f"{section}.{name}" in values:
            return values[f"{section}.{name}"]
    return None


def pip_download_command(version: str, dest: Path, python: str = sys.executable) -> list[str]:
    """The slow but sure way to get the sdist: pip itself (it also builds the sdist's metadata)."""
    return [
        python, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--progress-bar", "off",
        "--dest", str(dest), f"{PYPI_PROJECT}=={version}",
    ]  # fmt: skip


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_sdist(version: str, dest: Path, on_progress: ProgressFn | None) -> tuple[Path, str, str]:
    """The sdist of ``version`` in ``dest``, where it came from and its sha256 (checked against the pinned one).

    Straight from the index if we can, else via ``pip download``; :class:`IntegrityError` when a hash is wrong.
    """
    tarball, origin = _download(version, dest, on_progress)
    sha256 = file_sha256(tarball)
    pinned = KNOWN_SDIST_SHA256.get(version)
    if pinned is not None and sha256 != pinned:
        raise IntegrityError(f"{tarball.name} has sha256 {sha256}, expected {pinned}: refusing to build it")
    return tarball, origin, sha256


def _download(version: str, dest: Path, on_progress: ProgressFn | None) -> tuple[Path, str]:
    try:
        return _download_from_index(version, dest, on_progress)
    except IntegrityError:
        raise
    except TunerError as exc:
        fallback_reason = str(exc)
    except (httpx.HTTPError, OSError, ValueError, KeyError) as exc:
        fallback_reason = f"{type(exc).__name__}: {exc}"
    report(on_progress, "download", None, None, f"index lookup failed ({fallback_reason}); using pip download")
    for leftover in dest.iterdir():
        leftover.unlink()
    cmd = pip_download_command(version, dest)
    log_path = dest / "pip.log"
    with open(log_path, "w", encoding="utf-8", errors="replace") as log:
        rc, tail = run_logged(cmd, log, lambda line: report(on_progress, "download", None, None, line))
    if rc != 0:
        raise TunerError(f"pip download of {PYPI_PROJECT}=={version} failed: {condense_output(tail, 8)}")
    found = [p for p in dest.iterdir() if p.name in sdist_filenames(version)]
    if not found:
        raise TunerError(f"pip download did not leave {sdist_filenames(version)[0]} in {dest}")
    return found[0], "pip download"


def _pip_config() -> str:
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout if proc.returncode == 0 else ""


def _download_from_index(version: str, dest: Path, on_progress: ProgressFn | None) -> tuple[Path, str]:
    config = "" if os.environ.get("PIP_INDEX_URL") else _pip_config()
    index = os.environ.get("PIP_INDEX_URL") or pip_setting(config, "index-url") or "https://pypi.org/simple"
    cert = os.environ.get("PIP_CERT") or pip_setting(config, "cert")
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=cert) if cert and Path(cert).is_file() else True
    page_url = index.rstrip("/") + f"/{PYPI_PROJECT}/"
    headers = {"Accept": "application/vnd.pypi.simple.v1+json, text/html;q=0.1"}
    with httpx.Client(follow_redirects=True, timeout=httpx.Timeout(60.0, connect=20.0), verify=verify) as client:
        report(on_progress, "download", None, None, f"looking up {PYPI_PROJECT} {version} in {index}")
        response = client.get(page_url, headers=headers)
        response.raise_for_status()
        url, expected = find_sdist_in_index(
            response.text, response.headers.get("content-type", ""), str(response.url), version
        )
        target = dest / url.rsplit("/", 1)[-1]
        digest = hashlib.sha256()
        with client.stream("GET", url) as stream:
            stream.raise_for_status()
            total = int(stream.headers["content-length"]) if "content-length" in stream.headers else None
            done = 0
            with open(target, "wb") as out:
                for chunk in stream.iter_bytes(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    done += len(chunk)
                    report(on_progress, "download", done, total, None)
    if expected is not None and digest.hexdigest() != expected:
        raise IntegrityError(f"{target.name} from {url} has sha256 {digest.hexdigest()}, the index says {expected}")
    return target, url

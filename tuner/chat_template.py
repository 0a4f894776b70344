"""A model's current official chat template, fetched from its original Hub repo, and how llama.cpp compares them.

What a GGUF carries is ``tokenizer.chat_template``: the text the converter found when the file was made
(gguf-py/gguf/vocab.py:321-339, paths in llama.cpp's tree). When the original model's template is fixed later, files
converted before keep the old one; llama-server uses it unless ``--chat-template-file`` replaces it (which replaces
the ``tool_use`` variant too, common/chat.cpp:757-786).

* **Which file**: the converter's order: ``tokenizer_config.json``'s ``chat_template`` (a string, or the entry named
  ``default`` of a list), else ``chat_template.jinja``, else ``chat_template.json``'s ``chat_template``. The repo is
  listed first (:func:`tuner.remote.list_hub_repo`, which answers from its cache when the Hub cannot be reached), so
  only files that exist are asked for.
* **Where it is kept**: ``<cache>/chat-templates/<owner>/<name>/<commit>/chat_template.jinja``, the text as fetched
  (llama.cpp normalises it itself), with ``source.json`` naming the file it came from. A commit never changes, so
  neither does the entry; offline, the latest commit listed and its template answer.
* **The same template**: llama.cpp's Jinja lexer turns ``\\r\\n`` and lone ``\\r`` into ``\\n`` and drops one trailing
  character when the text ends with a newline (common/jinja/lexer.cpp:42-58); what ``/props`` returns as
  ``chat_template`` is that text. Two templates are the same when :func:`effective_template` makes them equal.

Templates are fetched at run time, never shipped: tuner's repository holds no template text.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

from tuner import __version__
from tuner import records as rec
from tuner.errors import TunerError
from tuner.paths import cache_dir, write_atomic
from tuner.untrusted import check_commit, check_repo_id, path_under

CACHE_SUBDIR = "chat-templates"
TEMPLATE_FILE = "chat_template.jinja"
#: the converter's order (gguf-py/gguf/vocab.py:321-339)
TEMPLATE_SOURCES = ("tokenizer_config.json", "chat_template.jinja", "chat_template.json")
MAX_TEMPLATE_CHARS = 1 << 20  # real templates are 5-20 kB
MAX_TEMPLATE_BYTES = 4 * MAX_TEMPLATE_CHARS  # UTF-8: at most 4 bytes a character
#: ``source.json`` beside a cached template: the repo file it came from (other keys are not read back).
SOURCE_RECORD = rec.record(file=rec.one_of(*TEMPLATE_SOURCES))
MAX_SOURCE_BYTES = 4096


def effective_template(text: str) -> str:
    """The template llama.cpp parses from ``text`` (common/jinja/lexer.cpp:42-58): CRLF and lone CR as LF, and one
    trailing character dropped when ``text`` ends with a newline."""
    src = text.replace("\r\n", "\n").replace("\r", "\n")
    return src[:-1] if text.endswith("\n") else src


def same_template(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and effective_template(a) == effective_template(b)


@dataclass(frozen=True)
class OfficialTemplate:
    """The official template of ``repo`` at ``commit``: its text, the file it came from, and the local copy
    (``path``) that ``--chat-template-file`` can be given."""

    repo: str
    commit: str
    source_file: str
    text: str
    path: Path
    from_cache: bool = False

    def describe(self) -> str:
        return f"{self.repo}/{self.source_file} at {self.commit[:8]}"


def _template_dir(repo: str, commit: str) -> Path:
    check_repo_id(repo)
    return path_under(cache_dir() / CACHE_SUBDIR, repo, check_commit(commit, where=repo),
                      what=f"a chat template cache path for {repo}")


def _cached(repo: str, commit: str) -> OfficialTemplate | None:
    """The cached template of ``repo`` at ``commit``; None (a cache miss: fetched again) when it is missing or
    anything in it is bad: the text too long or not UTF-8, ``source.json`` not JSON, nested, or of the wrong shape."""
    folder = _template_dir(repo, commit)
    try:
        with open(folder / TEMPLATE_FILE, "rb") as fh:
            text = fh.read(MAX_TEMPLATE_BYTES + 1).decode("utf-8")
        meta = rec.validate(SOURCE_RECORD, rec.read_json_file(folder / "source.json", MAX_SOURCE_BYTES))
    except (OSError, UnicodeDecodeError, rec.RecordError):
        return None
    if len(text) > MAX_TEMPLATE_CHARS:
        return None
    return OfficialTemplate(repo, commit, meta["file"], text, folder / TEMPLATE_FILE, from_cache=True)


def template_from_file(name: str, raw: bytes, where: str) -> str | None:
    """The template a repo file holds, read as the converter reads it; None when the file has none."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise TunerError(f"{where} is not UTF-8 text") from None
    if name == "chat_template.jinja":
        found: Any = text
    else:
        try:
            data = json.loads(text)
        except (ValueError, RecursionError):
            raise TunerError(f"{where} is not JSON") from None
        found = data.get("chat_template") if isinstance(data, dict) else None
        if isinstance(found, list):  # named templates: the default one
            found = next((t.get("template") for t in found
                          if isinstance(t, dict) and t.get("name") == "default"), None)
    if found is None:
        return None
    if not isinstance(found, str) or not found.strip() or len(found) > MAX_TEMPLATE_CHARS:
        raise TunerError(f"{where}: its chat_template is not a template (a string of at most {MAX_TEMPLATE_CHARS} "
                         "characters)")
    return found


def official_template(repo: str) -> OfficialTemplate:
    """``repo``'s current chat template, from the cache or the Hub (``HF_ENDPOINT``, ``HF_TOKEN`` and
    ``HF_HUB_OFFLINE`` honoured as :mod:`tuner.remote` honours them). One-line TunerError when it cannot be had:
    the Hub unreachable and nothing cached, no such repo, or a repo without a template."""
    from tuner import hub_api
    from tuner.remote import hub_endpoint, hub_token, list_hub_repo

    listing = list_hub_repo(repo)  # cached when the Hub cannot be reached; TunerError when never listed
    hit = _cached(repo, listing.commit)
    if hit is not None:
        return hit
    if listing.from_cache:
        raise TunerError(f"{repo}'s chat template was never fetched and the Hub cannot be reached now")
    names = {path for path, _ in listing.files}
    sources = [name for name in TEMPLATE_SOURCES if name in names]
    if not sources:
        raise TunerError(f"{repo} has no chat template ({', '.join(TEMPLATE_SOURCES)})")
    endpoint, token = hub_endpoint(), hub_token()
    headers = {"User-Agent": f"tuner/{__version__}", **({"Authorization": f"Bearer {token}"} if token else {})}

    async def fetch() -> tuple[str, str] | None:
        async with hub_api.client() as http:
            for name in sources:
                url = f"{endpoint}/{repo}/resolve/{listing.commit}/{quote(name)}"
                raw = await hub_api.fetch_small_file(http, url, headers, f"{repo}/{name}")
                text = template_from_file(name, raw, f"{repo}/{name}")
                if text is not None:
                    return name, text
        return None

    found = hub_api.run(fetch, f"fetching the chat template of {repo} from {endpoint}")
    if found is None:
        raise TunerError(f"{repo} has no chat template in {', '.join(sources)}")
    name, text = found
    folder = _template_dir(repo, listing.commit)
    path = folder / TEMPLATE_FILE
    with contextlib.suppress(OSError):  # a read-only cache: the text is still returned, not the file
        write_atomic(path, text, durable=False)
        write_atomic(folder / "source.json", json.dumps({"file": name, "repo": repo, "commit": listing.commit}))
    if not path.is_file():
        raise TunerError(f"cannot keep {repo}'s chat template in {folder} (is {cache_dir()} writable?)")
    return OfficialTemplate(repo, listing.commit, name, text, path)


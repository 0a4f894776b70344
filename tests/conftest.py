"""Shared fixtures: synthetic models of the real architectures, and the llama.cpp build (built once by ``tuner build``
itself and cached in the user cache, so CI pays for it once per machine)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from tunerproc import live_cmdlines

from tuner.build import LlamaBuild
from tuner.synth import SynthSpec, write_synthetic_gguf

_SESSION_CACHE_DIR = os.environ.get("TUNER_CACHE_DIR")


@pytest.fixture(scope="session")
def tiny_moe_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny qwen35moe with random weights: 4 layers (3 DeltaNet, 1 attention), 8 experts; serves on a CPU."""
    path = tmp_path_factory.mktemp("models") / "tiny-qwen35moe.gguf"
    write_synthetic_gguf(path, SynthSpec())
    return path


@pytest.fixture(scope="session")
def tiny_dense_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny qwen35 (dense FFN) with random weights."""
    path = tmp_path_factory.mktemp("models") / "tiny-qwen35.gguf"
    write_synthetic_gguf(path, SynthSpec(arch="qwen35", name="tiny-qwen35"))
    return path


@pytest.fixture(scope="session")
def bad_tokenizer_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny qwen35moe whose tokenizer model is 'gpX2' (same length as 'gpt2', so every offset holds): the tensors
    and shapes are fine (tuner plans it), llama.cpp's vocabulary loader refuses it while loading."""
    path = tmp_path_factory.mktemp("bad") / "bad-tokenizer.gguf"
    write_synthetic_gguf(path, SynthSpec())
    data = bytearray(path.read_bytes())
    at = data.find(b"gpt2", data.find(b"tokenizer.ggml.model"))
    assert at > 0
    data[at:at + 4] = b"gpX2"
    path.write_bytes(bytes(data))
    return path


@pytest.fixture(scope="session")
def llama_build() -> LlamaBuild:
    """llama-server built from the llama-cpp-python sdist's llama.cpp (CPU) by ``tuner build --source pypi`` as a user
    runs it (the first run on a machine compiles, ~5-10 minutes on 2 cores; later runs find it in the user cache)."""
    from tuner.build import BuildSpec, find_build, parse_source

    with pytest.MonkeyPatch.context() as env:  # the user cache, even if the first test to ask moved it
        if _SESSION_CACHE_DIR is None:
            env.delenv("TUNER_CACHE_DIR", raising=False)
        else:
            env.setenv("TUNER_CACHE_DIR", _SESSION_CACHE_DIR)
        proc = subprocess.run([sys.executable, "-m", "tuner", "build", "--source", "pypi", "--no-cuda", "--json"],
                              stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=1500)
        if proc.returncode != 0:
            pytest.fail(f"tuner build --source pypi failed ({proc.returncode}): {proc.stderr[-3000:]}")
        result = json.loads(proc.stdout)
        built = find_build(BuildSpec(*parse_source("pypi"), cuda=False))
    assert built is not None and str(built.server_bin) == result["server_bin"], result
    return built


@pytest.fixture(scope="session")
def server_bin(llama_build: LlamaBuild) -> Path:
    return Path(llama_build.server_bin)


def _live_processes_naming(needle: str) -> list[int]:
    """Live (not zombie) processes other than this one whose command line contains ``needle``."""
    return [pid for pid, argv in live_cmdlines() if needle.encode() in b" ".join(argv)]


@pytest.fixture
def processes_naming() -> Callable[[str], list[int]]:
    """``processes_naming(text)``: live processes whose command line contains ``text``, to show nothing is orphaned."""
    return _live_processes_naming


@pytest.fixture
def broken_llama_source(tmp_path: Path) -> Path:
    """A folder that passes tuner's llama.cpp source check but whose CMakeLists.txt does not configure."""
    source = tmp_path / "llama.cpp"
    (source / "src").mkdir(parents=True)
    (source / "include").mkdir()
    (source / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.14)\nproject(broken NONE)\n"
                                           "this_is_not_a_cmake_command(\n")
    (source / "src" / "llama.cpp").write_text("// not really\n")
    (source / "include" / "llama.h").write_text("// not really\n")
    return source


@pytest.fixture
def card_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[SimpleNamespace]:
    """A card ``tiny-card`` (in a catalog folder, ``TUNER_CATALOG_DIR``) whose default repo on the loopback Hub
    (``HF_ENDPOINT``) holds a Q8_0 file that is not the mix the card records for it: its routed experts are f16,
    where llama-quantize's Q8_0 (the card's) has q8_0. Yields ``hub``, ``card``, ``repo`` and ``file`` (the
    repo's file as the Hub serves it)."""
    sys.path.insert(0, str(Path(__file__).parent))
    try:
        import hubserver
    finally:
        sys.path.pop(0)
    card, repo = "tiny-card", "acme/Tiny-Card-GGUF"
    spec = SynthSpec(name="Tiny-Card", types={"experts": "f16", "matrix": "q8_0", "embd": "q8_0", "output": "q8_0"})
    repo_dir = tmp_path / "hub" / repo
    write_synthetic_gguf(repo_dir / "Tiny-Q8_0.gguf", spec)
    catalog = tmp_path / "catalog"
    hubserver.write_tiny_card(catalog, key=card, repo=repo, stem="Tiny", spec=spec, mixes={"Q8_0": "Q8_0"})
    with hubserver.FakeHub(tmp_path / "hub", tokens={}) as hub:
        monkeypatch.setenv("TUNER_CATALOG_DIR", str(catalog))
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setenv("TUNER_CACHE_DIR", str(tmp_path / "tuner-cache"))
        yield SimpleNamespace(hub=hub, card=card, repo=repo, file=repo_dir / "Tiny-Q8_0.gguf")

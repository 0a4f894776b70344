"""Shared fixtures: synthetic models of the real architectures, and the llama.cpp build (built once, cached in the
user cache by ``tuner build``'s own code, so CI pays for it once per machine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuner.synth import SynthSpec, write_synthetic_gguf


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
def llama_build():  # -> tuner.build.LlamaBuild
    """llama-server built from the llama-cpp-python sdist's llama.cpp (CPU), or reused from the cache."""
    from tuner.build import ensure_build, resolve_spec

    return ensure_build(resolve_spec("pypi", cuda=False))


@pytest.fixture(scope="session")
def server_bin(llama_build) -> Path:
    return Path(llama_build.server_bin)

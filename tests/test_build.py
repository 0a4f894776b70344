"""tuner.build: sources, cache keys, the cache itself, atomic publishing, real CMake failures, real binaries."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import subprocess
import tarfile
import threading
import time
from pathlib import Path

import pytest

from tuner.build import cache as build_cache
from tuner.build import cmake, pypi, source
from tuner.build import spec as build_spec
from tuner.build.binaries import LlamaBuild, build_from_binary, parse_version_output
from tuner.build.cache import current_build, ensure_build, find_build, publish_build
from tuner.build.cmake import (
    TARGET_OPTIONS,
    TARGETS,
    build_command,
    cmake_options,
    configure_command,
    reset_stale_build_dir,
)
from tuner.build.pypi import find_sdist_in_index, pip_download_command, pip_setting
from tuner.build.source import (
    DEFAULT_GIT_REF,
    DEFAULT_PYPI_VERSION,
    build_number_from_ref,
    git_fetch_commands,
    parse_source,
    unpack_sdist,
)
from tuner.build.spec import BuildSpec, build_key, cuda_archs, decide_cuda, resolve_spec
from tuner.build.steps import cache_lock, condense_output, parse_progress
from tuner.errors import TunerError

FAKE_VERSION = "version: 0.5.0-dev (build 7, commit abc1234)\nbuilt with GNU 12.2.0 for Linux x86_64"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("TUNER_CACHE_DIR", str(root))
    return root


def _fake_bins(directory: Path, version_text: str = FAKE_VERSION) -> Path:
    """Three tiny executables; llama-server prints ``version_text`` for --version, on stderr like llama.cpp."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in TARGETS:
        script = directory / name
        body = "".join(f"echo '{line}' >&2\n" for line in version_text.splitlines())
        script.write_text(f"#!/bin/sh\n{body}")
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return directory


def _fake_source(directory: Path, cmakelists: str = "project(fake NONE)\n") -> Path:
    (directory / "src").mkdir(parents=True)
    (directory / "include").mkdir()
    (directory / "CMakeLists.txt").write_text(cmakelists)
    (directory / "src" / "llama.cpp").write_text("// fake\n")
    (directory / "include" / "llama.h").write_text("// fake\n")
    return directory


def _forbid_subprocesses(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"a subprocess was started: {args!r}")

    monkeypatch.setattr(subprocess, "Popen", refuse)
    for module in (pypi, source, cmake):
        monkeypatch.setattr(module, "run_logged", refuse)


# --------------------------------------------------------------------------------------------- sources


def test_pypi_source_defaults_to_the_pinned_version() -> None:
    assert parse_source("pypi") == ("pypi", DEFAULT_PYPI_VERSION)
    assert parse_source(" pypi:0.3.35 ") == ("pypi", "0.3.35")


def test_git_source_defaults_to_the_pinned_release_tag() -> None:
    assert parse_source("git") == ("git", DEFAULT_GIT_REF)
    assert parse_source("git:master") == ("git", "master")


def test_anything_else_is_a_local_directory_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert parse_source("./pypi") == ("local", str(tmp_path / "pypi"))
    assert parse_source("llama.cpp") == ("local", str(tmp_path / "llama.cpp"))


@pytest.mark.parametrize("text", ["", "pypi:", "pypi:latest!", "git:", "git:--upload-pack=x", "git:a..b"])
def test_malformed_sources_are_refused(text: str) -> None:
    with pytest.raises(TunerError):
        parse_source(text)


def test_local_source_must_be_a_llama_cpp_tree(tmp_path: Path) -> None:
    (tmp_path / "CMakeLists.txt").write_text("project(x)\n")
    with pytest.raises(TunerError, match=r"src/llama\.cpp"):
        resolve_spec(str(tmp_path), cuda=False)
    with pytest.raises(TunerError, match="not a directory"):
        resolve_spec(str(tmp_path / "nope"), cuda=False)


def test_llama_cpp_python_checkout_resolves_to_its_vendored_tree(tmp_path: Path) -> None:
    vendored = _fake_source(tmp_path / "vendor" / "llama.cpp")
    spec = resolve_spec(str(tmp_path), cuda=False)
    assert (spec.source_kind, spec.source_ref) == ("local", str(vendored))


def test_unpack_sdist_takes_only_vendored_llama_cpp_and_reads_its_commit(tmp_path: Path) -> None:
    commit = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
    files = {
        "pkg-1.0/pyproject.toml": "x",
        "pkg-1.0/.git/modules/vendor/llama.cpp/HEAD": commit + "\n",
        "pkg-1.0/vendor/llama.cpp/.git": "gitdir: ../../.git/modules/vendor/llama.cpp\n",
        "pkg-1.0/vendor/llama.cpp/CMakeLists.txt": "project(llama)\n",
        "pkg-1.0/vendor/llama.cpp/src/llama.cpp": "//\n",
        "pkg-1.0/vendor/llama.cpp/src/models/qwen35.cpp": "//\n",  # src/models is source, kept
        "pkg-1.0/vendor/llama.cpp/include/llama.h": "//\n",
        "pkg-1.0/vendor/llama.cpp/models/ggml-vocab.gguf": "big",
        "pkg-1.0/vendor/llama.cpp/docs/build.md": "doc",
    }
    tarball = _tarball(tmp_path / "pkg-1.0.tar.gz", files)
    assert unpack_sdist(tarball, tmp_path / "out") == commit
    tree = tmp_path / "out" / "llama.cpp"
    got = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_file())
    assert got == ["CMakeLists.txt", "include/llama.h", "src/llama.cpp", "src/models/qwen35.cpp"]


def test_unpack_sdist_refuses_paths_that_escape(tmp_path: Path) -> None:
    files = {
        "pkg-1.0/vendor/llama.cpp/CMakeLists.txt": "x",
        "pkg-1.0/vendor/llama.cpp/../../../evil": "x",
    }
    with pytest.raises(TunerError, match="unsafe path"):
        unpack_sdist(_tarball(tmp_path / "bad.tar.gz", files), tmp_path / "out")
    assert not (tmp_path / "evil").exists()


def _tarball(path: Path, files: dict[str, str]) -> Path:
    with tarfile.open(path, "w:gz") as archive:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_index_json_page_gives_the_sdist_url_and_hash() -> None:
    page = json.dumps(
        {
            "files": [
                {"filename": "llama_cpp_python-0.3.36-cp311-linux.whl", "url": "w.whl", "hashes": {}},
                {"filename": "llama_cpp_python-0.3.36.tar.gz", "url": "../../f/l.tar.gz", "hashes": {"sha256": "ab"}},
            ]
        }
    )
    url, sha = find_sdist_in_index(
        page, "application/vnd.pypi.simple.v1+json", "https://idx/simple/llama-cpp-python/", "0.3.36"
    )
    assert (url, sha) == ("https://idx/f/l.tar.gz", "ab")


def test_index_html_page_gives_the_sdist_url_and_hash() -> None:
    page = (
        '<a href="https://files/llama_cpp_python-0.3.35.tar.gz#sha256=00">x</a>\n'
        '<a href="/p/llama_cpp_python-0.3.36.tar.gz#sha256=cd" data-requires-python="&gt;=3.8">y</a>'
    )
    url, sha = find_sdist_in_index(page, "text/html", "https://idx/simple/llama-cpp-python/", "0.3.36")
    assert (url, sha) == ("https://idx/p/llama_cpp_python-0.3.36.tar.gz", "cd")
    with pytest.raises(TunerError, match=r"no llama-cpp-python 9\.9"):
        find_sdist_in_index(page, "text/html", "https://idx/simple/llama-cpp-python/", "9.9")


def test_pip_settings_follow_pips_precedence() -> None:
    listing = "global.index-url='https://g/simple'\ndownload.index-url='https://d/simple'\nglobal.cert='/c.pem'\n"
    assert pip_setting(listing, "index-url") == "https://d/simple"
    assert pip_setting(":env:.index-url='https://e/simple'\n" + listing, "index-url") == "https://e/simple"
    assert pip_setting(listing, "cert") == "/c.pem"
    assert pip_setting(listing, "trusted-host") is None


def test_pip_fallback_downloads_only_the_sdist(tmp_path: Path) -> None:
    cmd = pip_download_command("0.3.36", tmp_path, python="py")
    assert cmd[:4] == ["py", "-m", "pip", "download"]
    assert {"--no-deps", ":all:", "llama-cpp-python==0.3.36"} <= set(cmd)
    assert cmd[cmd.index("--no-binary") + 1] == ":all:"
    assert cmd[cmd.index("--dest") + 1] == str(tmp_path)


def test_git_source_is_a_shallow_clone_of_the_pinned_tag(tmp_path: Path) -> None:
    [cmd] = git_fetch_commands(DEFAULT_GIT_REF, tmp_path / "llama.cpp")
    assert cmd[-2:] == ["https://github.com/ggml-org/llama.cpp", str(tmp_path / "llama.cpp")]
    assert cmd[cmd.index("--depth") + 1] == "1"
    assert cmd[cmd.index("--branch") + 1] == "b11312"
    assert build_number_from_ref("b11312") == 11312
    assert build_number_from_ref("master") == 0


def test_git_commit_hash_is_fetched_shallowly_rather_than_cloned(tmp_path: Path) -> None:
    sha = "0c1e57098bba43ac29e6e3b677cdceebdd22334f"
    init, fetch, checkout = git_fetch_commands(sha, tmp_path)
    assert init[:2] == ["git", "init"] and init[-1] == str(tmp_path)
    assert fetch[-4:] == ["--depth", "1", "https://github.com/ggml-org/llama.cpp", sha]
    assert checkout[-3:] == ["checkout", "--quiet", "FETCH_HEAD"]


# --------------------------------------------------------------------------------------------- keys, options


def test_cache_key_names_source_and_variant() -> None:
    assert build_key(BuildSpec("pypi", "0.3.36", False)) == "pypi-0.3.36-cpu"
    assert build_key(BuildSpec("pypi", "0.3.36", True, ("89",))) == "pypi-0.3.36-cuda-89"
    assert build_key(BuildSpec("git", "b11312", True, ("86", "89"))) == "git-b11312-cuda-86-89"
    assert build_key(BuildSpec("git", "b11312", True)) == "git-b11312-cuda-portable"


def test_cache_key_of_a_local_source_depends_on_its_path() -> None:
    a = build_key(BuildSpec("local", "/x/llama.cpp", False))
    b = build_key(BuildSpec("local", "/y/llama.cpp", False))
    assert a.startswith("local-llama.cpp-") and a.endswith("-cpu") and a != b


def test_extra_cmake_options_add_a_hash_to_the_key() -> None:
    plain = BuildSpec("pypi", "0.3.36", False)
    one = resolve_spec("pypi", cuda=False, extra_cmake_args=["-DGGML_CUDA_FA_ALL_QUANTS=ON", "GGML_LTO=ON"])
    same = resolve_spec("pypi", cuda=False, extra_cmake_args=["GGML_LTO=ON", "-DGGML_CUDA_FA_ALL_QUANTS:BOOL=ON"])
    other = resolve_spec("pypi", cuda=False, extra_cmake_args=["GGML_LTO=OFF"])
    assert build_key(one) == build_key(same)
    assert build_key(one).startswith(build_key(plain) + "-")
    assert len({build_key(plain), build_key(one), build_key(other)}) == 3
    with pytest.raises(TunerError, match="-DNAME=VALUE"):
        resolve_spec("pypi", cuda=False, extra_cmake_args=["--fresh"])


def test_cuda_architectures_follow_llama_cpps_naming() -> None:
    assert cuda_archs([(8, 9)]) == ("89",)
    assert cuda_archs([(9, 0)]) == ("90",)  # ggml uses no sm_90a-only instructions
    assert cuda_archs([(12, 0)]) == ("120a",)  # what ggml's CMake rewrites 12x to for the FP4 MMA paths
    assert cuda_archs([(8, 9), (8, 6), (8, 9)]) == ("86", "89")
    with pytest.raises(TunerError, match="too old"):
        cuda_archs([(3, 5)])


@pytest.mark.parametrize(
    ("requested", "caps", "nvcc", "expected"),
    [
        (None, (), "/usr/bin/nvcc", False),  # nvcc but no GPU: this machine
        (None, ((8, 9),), None, False),  # GPU but no toolkit
        (None, ((8, 9),), "/usr/bin/nvcc", True),
        (False, ((8, 9),), "/usr/bin/nvcc", False),
        (True, (), "/usr/bin/nvcc", True),
    ],
)
def test_cuda_auto_needs_both_a_gpu_and_nvcc(
    requested: bool | None, caps: tuple[tuple[int, int], ...], nvcc: str | None, expected: bool
) -> None:
    assert decide_cuda(requested, caps, nvcc) is expected


def _nvml_capabilities() -> tuple[tuple[int, int], ...]:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return ()
    try:
        count = pynvml.nvmlDeviceGetCount()
        return tuple(
            tuple(pynvml.nvmlDeviceGetCudaComputeCapability(pynvml.nvmlDeviceGetHandleByIndex(i))) for i in range(count)
        )
    finally:
        pynvml.nvmlShutdown()


def test_cuda_auto_builds_for_cuda_only_where_nvml_sees_a_gpu() -> None:
    caps = _nvml_capabilities()
    spec = resolve_spec("pypi", cuda=None, gpu_compute_capabilities=caps)
    assert spec.cuda is (bool(caps) and build_spec.find_nvcc() is not None)
    if not caps:  # this machine: nvcc, no GPU
        assert build_key(spec) == f"pypi-{DEFAULT_PYPI_VERSION}-cpu"


def test_cuda_forced_without_nvcc_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_spec, "find_nvcc", lambda: None)
    with pytest.raises(TunerError, match="nvcc"):
        resolve_spec("pypi", cuda=True, gpu_compute_capabilities=((8, 9),))


def test_cuda_forced_with_gpus_targets_exactly_those_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(build_spec, "find_nvcc", lambda: "/opt/cuda/bin/nvcc")
    spec = resolve_spec("pypi:0.3.36", cuda=True, gpu_compute_capabilities=((8, 9), (8, 6)))
    assert build_key(spec) == "pypi-0.3.36-cuda-86-89"
    options = cmake_options(spec, commit_id="0c1e570", build_number=0)
    assert (options["GGML_CUDA"], options["CMAKE_CUDA_ARCHITECTURES"]) == ("ON", "86;89")


def test_cmake_options_build_static_native_and_download_nothing() -> None:
    options = cmake_options(BuildSpec("pypi", "0.3.36", False), commit_id="0c1e570", build_number=0)
    assert options["GGML_CUDA"] == "OFF"
    assert "CMAKE_CUDA_ARCHITECTURES" not in options
    for name, value in {
        "GGML_NATIVE": "ON",
        "BUILD_SHARED_LIBS": "OFF",
        "LLAMA_USE_PREBUILT_UI": "OFF",
        "LLAMA_BUILD_TESTS": "OFF",
        "LLAMA_BUILD_COMMIT": "0c1e570",
        "LLAMA_BUILD_NUMBER": "0",
    }.items():
        assert options[name] == value, name
    cmd = configure_command(Path("/s"), Path("/b"), options, "Ninja")
    assert cmd[:7] == ["cmake", "-S", "/s", "-B", "/b", "-G", "Ninja"]
    assert "-DLLAMA_USE_PREBUILT_UI=OFF" in cmd
    assert build_command(Path("/b"), 2)[-4:] == ["llama-server", "llama-bench", "llama-fit-params", "ggml-rpc-server"]
    assert options["GGML_RPC"] == "ON"


def test_every_target_is_built_with_the_options_it_needs() -> None:
    options = cmake_options(BuildSpec("pypi", "0.3.36", False), commit_id="x", build_number=0)
    assert options["LLAMA_BUILD_SERVER"] == "ON"
    for name, needed in TARGET_OPTIONS.items():
        assert name in build_command(Path("/b"), 2)
        assert needed.items() <= options.items(), name


def test_extra_cmake_options_override_the_defaults() -> None:
    spec = resolve_spec("pypi", cuda=False, extra_cmake_args=["-DGGML_NATIVE=OFF"])
    assert cmake_options(spec, commit_id="x", build_number=0)["GGML_NATIVE"] == "OFF"


# --------------------------------------------------------------------------------------------- output


def test_build_progress_is_read_from_ninja_and_make_lines() -> None:
    assert parse_progress("[63/214] Building CXX object src/x.o") == (63, 214)
    assert parse_progress("[ 45%] Building CXX object src/x.o") == (45, 100)
    assert parse_progress("-- Configuring done") == (None, None)


def test_condensed_failure_keeps_errors_and_drops_noise() -> None:
    lines = [f"[{i}/214] Building CXX object src/f{i}.o" for i in range(1, 50)]
    lines += [
        "FAILED: src/CMakeFiles/llama.dir/llama.cpp.o",
        "/usr/bin/c++ " + "-Ifoo " * 80 + " -c /s/src/llama.cpp -o src/llama.cpp.o",
        "/s/src/llama.cpp:12:3: error: 'foo' was not declared in this scope",
        "   12 |   foo();",
        "   12 |   foo();",
        "ninja: build stopped: subcommand failed.",
    ]
    text = condense_output(lines)
    assert "Building CXX" not in text and "-Ifoo" not in text
    assert text == (
        "FAILED: src/CMakeFiles/llama.dir/llama.cpp.o | /s/src/llama.cpp:12:3: error: 'foo' was not declared in"
        " this scope | 12 |   foo(); | ninja: build stopped: subcommand failed."
    )


def test_condensed_failure_keeps_the_first_error_when_notes_follow_it() -> None:
    lines = ["x.cpp:1:1: error: first", *[f"note: candidate {i}" for i in range(40)]]
    text = condense_output(lines, max_lines=5)
    assert text.split(" | ") == ["x.cpp:1:1: error: first", "…", "note: candidate 37", "note: candidate 38",
                                 "note: candidate 39"]  # fmt: skip


def test_version_output_of_current_and_old_llama_cpp() -> None:
    noisy = "ggml_cuda_init: found 1 CUDA devices:\n" + FAKE_VERSION + "\n"
    assert parse_version_output(noisy) == (FAKE_VERSION, "abc1234")
    assert parse_version_output("version: 4567 (9f2250ba)\nbuilt with cc for x86_64") == (
        "version: 4567 (9f2250ba)\nbuilt with cc for x86_64",
        "9f2250ba",
    )
    with pytest.raises(TunerError, match="version"):
        parse_version_output("usage: foo [options]\n")


# --------------------------------------------------------------------------------------------- cache


def test_cached_entry_is_reused_without_running_pip_git_or_cmake(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = BuildSpec("pypi", "0.3.36", False)
    meta = {
        "source": "pypi:0.3.36",
        "commit": "0c1e57098bba43ac29e6e3b677cdceebdd22334f",  # read back the way --version prints it
        "cmake_options": {"GGML_NATIVE": "ON"},
        "cuda": False,
    }
    published = publish_build(build_key(spec), _fake_bins(tmp_path / "bin"), meta)
    _forbid_subprocesses(monkeypatch)
    events: list[str] = []
    got = ensure_build(spec, on_progress=lambda stage, done, total, line: events.append(stage))
    assert got == published
    assert events == ["cached"]
    assert got.root == cache / "builds" / "pypi-0.3.36-cpu"
    assert (got.version_text, got.commit, got.cuda) == (FAKE_VERSION, "0c1e570", False)
    assert got.options == {"GGML_NATIVE": "ON"}
    assert got.server_bin == got.root / "bin" / "llama-server"


def test_incomplete_cache_entry_is_not_a_build(cache: Path, tmp_path: Path) -> None:
    spec = BuildSpec("pypi", "0.3.36", False)
    entry = publish_build(build_key(spec), _fake_bins(tmp_path / "bin"), {"cuda": False}).root
    assert find_build(spec) is not None
    (entry / "bin" / "llama-bench").unlink()
    assert find_build(spec) is None


def test_a_cached_build_missing_any_target_is_not_a_build(cache: Path, tmp_path: Path) -> None:
    spec = BuildSpec("pypi", "0.3.36", False)
    for name in TARGETS:
        entry = publish_build(build_key(spec), _fake_bins(tmp_path / name), {"cuda": False}).root
        (entry / "bin" / name).unlink()
        assert find_build(spec) is None, name


def test_current_build_is_the_cached_default_build_once_there_is_one(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(build_cache, "read_gpus", lambda: ((), "no GPUs"))
    assert current_build() is None
    published = publish_build(f"pypi-{DEFAULT_PYPI_VERSION}-cpu", _fake_bins(tmp_path / "bin"), {"cuda": False})
    assert current_build() == published


def test_current_build_with_a_server_bin_is_that_binary(tmp_path: Path) -> None:
    bins = _fake_bins(tmp_path / "bin")
    got = current_build(str(bins / "llama-server"))
    assert got is not None and got.server_bin == bins / "llama-server" and got.commit == "abc1234"


def test_interrupted_publish_leaves_no_entry_and_no_temp_dir(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    copied: list[Path] = []

    def interrupted(server_bin: Path) -> tuple[str, str]:
        copied.append(server_bin)
        assert server_bin.is_file()  # the binaries are already in the temp dir when Ctrl-C comes
        raise KeyboardInterrupt

    monkeypatch.setattr(build_cache, "llama_version", interrupted)
    with pytest.raises(KeyboardInterrupt):
        publish_build("pypi-0.3.36-cpu", _fake_bins(tmp_path / "bin"), {"cuda": False})
    assert copied and copied[0].parent.parent.name.startswith(".tmp-pypi-0.3.36-cpu-")
    assert list((cache / "builds").iterdir()) == []


def test_interrupted_compile_publishes_nothing(cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = _fake_source(tmp_path / "llama.cpp")

    def runner(cmd: list[str], log: object, on_line: object = None, **kwargs: object) -> tuple[int, list[str]]:
        if "--build" in cmd:
            raise KeyboardInterrupt
        return 0, []

    monkeypatch.setattr(cmake, "run_logged", runner)
    spec = resolve_spec(str(source), cuda=False)
    with pytest.raises(KeyboardInterrupt):
        ensure_build(spec)
    assert find_build(spec) is None
    assert not (cache / "builds").exists() or list((cache / "builds").iterdir()) == []


def test_local_source_is_rebuilt_and_republished_each_time(
    cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = _fake_source(tmp_path / "llama.cpp")
    versions = iter(["version: 1 (build 0, commit local)", "version: 2 (build 0, commit local)"])
    commands: list[list[str]] = []

    def runner(cmd: list[str], log: object, on_line: object = None, **kwargs: object) -> tuple[int, list[str]]:
        commands.append(cmd)
        if "--build" in cmd:
            _fake_bins(Path(cmd[cmd.index("--build") + 1]) / "bin", next(versions))
        return 0, []

    monkeypatch.setattr(cmake, "run_logged", runner)
    spec = resolve_spec(str(source), cuda=False)
    first = ensure_build(spec)
    second = ensure_build(spec)
    assert first.root == second.root
    assert (first.version_text, second.version_text) == (
        "version: 1 (build 0, commit local)",
        "version: 2 (build 0, commit local)",
    )
    assert len(commands) == 4  # configure + build, twice
    assert commands[0][commands[0].index("-S") + 1] == str(source)
    assert "-DLLAMA_BUILD_COMMIT=local" in commands[0]
    assert [p.name for p in (cache / "builds").iterdir()] == [build_key(spec)]
    meta = json.loads((second.root / "build.json").read_text())
    assert meta["source"] == f"local:{source}" and meta["cuda"] is False and meta["version_text"] == second.version_text


def test_build_dir_made_for_another_source_is_started_afresh(tmp_path: Path) -> None:
    build_dir = tmp_path / "build"
    build_dir.mkdir()
    (build_dir / "CMakeCache.txt").write_text(
        "CMAKE_GENERATOR:INTERNAL=Ninja\nCMAKE_HOME_DIRECTORY:INTERNAL=/tmp/elsewhere/llama.cpp\n"
    )
    reset_stale_build_dir(build_dir, tmp_path / "src", "Ninja")
    assert not build_dir.exists()
    build_dir.mkdir()
    (build_dir / "CMakeCache.txt").write_text(
        f"CMAKE_GENERATOR:INTERNAL=Ninja\nCMAKE_HOME_DIRECTORY:INTERNAL={tmp_path / 'src'}\n"
    )
    reset_stale_build_dir(build_dir, tmp_path / "src", "Ninja")
    assert build_dir.exists()


def test_second_builder_of_a_key_waits_for_the_first(cache: Path) -> None:
    waited = threading.Event()
    entered = threading.Event()

    def second() -> None:
        with cache_lock("k", on_wait=waited.set):
            entered.set()

    with cache_lock("k"):
        assert (cache / "locks" / "k.lock").exists()
        thread = threading.Thread(target=second)
        thread.start()
        assert waited.wait(5)
        time.sleep(0.2)
        assert not entered.is_set()
    thread.join(5)
    assert entered.is_set()


# --------------------------------------------------------------------------------------------- real cmake


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_broken_local_source_fails_with_the_log_path_and_publishes_nothing(cache: Path, tmp_path: Path) -> None:
    source = _fake_source(tmp_path / "broken", "cmake_minimum_required(VERSION 3.14)\nproject(broken NONE\n")
    spec = resolve_spec(str(source), cuda=False)
    stages: list[str] = []
    with pytest.raises(TunerError) as caught:
        ensure_build(spec, on_progress=lambda stage, done, total, line: stages.append(stage))
    log = cache / "work" / build_key(spec) / "build.log"
    message = str(caught.value)
    assert "configure failed" in message
    assert str(log) in message
    assert "Parse error" in message or "CMake Error" in message
    assert "CMake Error" in log.read_text()
    assert "build" not in stages and "publish" not in stages
    assert find_build(spec) is None
    assert not (cache / "builds").exists() or list((cache / "builds").iterdir()) == []


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None, reason="needs cmake and c++")
def test_compiler_error_is_quoted_with_the_log_path_and_publishes_nothing(cache: Path, tmp_path: Path) -> None:
    """A source tree that configures but does not compile: the real compiler's error line is in the one-line
    message, with the build log's path; the other targets' progress lines and command lines are not."""
    cmakelists = (
        "cmake_minimum_required(VERSION 3.14)\nproject(broken CXX)\n"
        "add_executable(llama-server src/server.cpp)\n"
        "add_executable(llama-bench src/ok.cpp)\nadd_executable(llama-fit-params src/ok.cpp)\n"
        "add_executable(ggml-rpc-server src/ok.cpp)\n"
    )
    source = _fake_source(tmp_path / "broken", cmakelists)
    (source / "src" / "ok.cpp").write_text("int main() { return 0; }\n")
    (source / "src" / "server.cpp").write_text("int main() { return undeclared_thing; }\n")
    spec = resolve_spec(str(source), cuda=False)
    stages: list[str] = []
    with pytest.raises(TunerError) as caught:
        ensure_build(spec, on_progress=lambda stage, done, total, line: stages.append(stage))
    message = caught.value.one_line()
    log = cache / "work" / build_key(spec) / "build.log"
    assert "llama.cpp build failed" in message and f"full log: {log}" in message
    assert "error:" in message and "undeclared_thing" in message  # the compiler's own words
    assert "-o " not in message  # not the compiler command line
    assert "undeclared_thing" in log.read_text()
    assert "configure" in stages and "build" in stages and "publish" not in stages
    assert find_build(spec) is None
    assert not (cache / "builds").exists() or list((cache / "builds").iterdir()) == []


# --------------------------------------------------------------------------------------------- real binaries


def test_server_bin_that_does_not_exist_or_is_not_llama_cpp_is_refused(tmp_path: Path) -> None:
    with pytest.raises(TunerError, match="does not exist"):
        build_from_binary(tmp_path / "llama-server")
    impostor = _fake_bins(tmp_path / "bin", "usage: something else")
    with pytest.raises(TunerError, match="version"):
        build_from_binary(impostor / "llama-server")
    failing = tmp_path / "failing"
    failing.write_text("#!/bin/sh\necho 'error while loading shared libraries: libcuda.so.1' >&2\nexit 127\n")
    failing.chmod(0o755)
    with pytest.raises(TunerError, match=r"exit code 127.*libcuda"):
        build_from_binary(failing)


def test_server_bin_picks_up_the_tools_beside_it(tmp_path: Path) -> None:
    bins = _fake_bins(tmp_path / "bin")
    (bins / "llama-fit-params").unlink()
    got = build_from_binary(bins / "llama-server")
    assert (got.bench_bin, got.fit_params_bin) == (bins / "llama-bench", None)
    assert (got.version_text, got.commit, got.cuda) == (FAKE_VERSION, "abc1234", False)


@pytest.mark.server
def test_server_bin_from_the_real_build_runs(llama_build: LlamaBuild) -> None:
    real = llama_build
    got = build_from_binary(real.server_bin)
    assert got.version_text == real.version_text
    assert got.version_text.startswith("version: ")
    assert got.bench_bin == real.bench_bin and got.fit_params_bin == real.fit_params_bin
    assert got.cuda is False


@pytest.mark.server
def test_ensure_build_of_the_default_source_gives_a_working_llama_server() -> None:
    spec = resolve_spec("pypi")
    was_cached = find_build(spec) is not None
    started = time.monotonic()
    got = ensure_build(spec)
    seconds = time.monotonic() - started
    proc = subprocess.run([str(got.server_bin), "--version"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "version:" in proc.stdout + proc.stderr
    assert got.bench_bin is not None and os.access(got.bench_bin, os.X_OK)
    assert got.fit_params_bin is not None and os.access(got.fit_params_bin, os.X_OK)
    assert got.rpc_server_bin is not None and os.access(got.rpc_server_bin, os.X_OK)
    rpc = subprocess.run([str(got.server_bin), "--rpc", "127.0.0.1:1", "--version"], capture_output=True, text=True,
                         timeout=60, env={**os.environ, "GGML_NO_BACKTRACE": "1"})
    assert "RPC not supported" not in rpc.stdout + rpc.stderr  # llama-server itself has the --rpc client
    print(f"ensure_build: {seconds:.2f} s ({'cached' if was_cached else 'built'})")

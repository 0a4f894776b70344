"""Bench's llama-servers: a pool of them by set name, each launch recorded (its command, load time, slots)."""

from __future__ import annotations

import os
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuner.bench.flagsets import FlagSet, slug
from tuner.llama_api import PROPS, TOKENIZE
from tuner.server import LlamaServer

ProgressFn = Callable[[str], None]


@dataclass(frozen=True)
class Launch:
    """One llama-server start: which set, its exact command line, and how long it took to become ready."""

    name: str
    command: tuple[str, ...]
    load_s: float
    n_ctx_slot: int
    total_slots: int
    build_info: str = ""


@dataclass
class LiveServer:
    fs: FlagSet
    server: LlamaServer
    n_ctx_slot: int
    total_slots: int
    unified: bool
    warmed: bool = False


class ServerPool:
    """The llama-servers of a benchmark, by set name; each launch is recorded. Use as a context manager."""

    def __init__(self, server_bin: str | os.PathLike[str], model_path: str | os.PathLike[str], *,
                 log_dir: Path | None = None, ready_timeout_s: float = 900.0,
                 on_progress: ProgressFn | None = None) -> None:
        self.server_bin = Path(server_bin)
        self.model_path = Path(model_path)
        self.log_dir = log_dir
        self.ready_timeout_s = ready_timeout_s
        self.on_progress = on_progress
        self.live: dict[str, LiveServer] = {}
        self.launches: list[Launch] = []

    def _say(self, line: str) -> None:
        if self.on_progress:
            self.on_progress(line)

    def up(self, fs: FlagSet) -> LiveServer:
        """The running server of ``fs``, started (and waited for) if it is not up."""
        live = self.live.get(fs.name)
        if live is not None and live.server.running():
            return live
        log_path = None
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
            log_path = self.log_dir / f"{slug(fs.name)}-{len(self.launches) + 1}.log"
        server = LlamaServer(self.server_bin, self.model_path, list(fs.args), log_path=log_path)
        self._say(f"starting {fs.name}: llama-server {shlex.join(fs.args)}")
        server.start()
        try:
            load_s = server.wait_ready(self.ready_timeout_s)
            props = get_props(server)
        except BaseException:
            server.stop()
            raise
        n_ctx_slot = props["default_generation_settings"]["n_ctx"]
        total_slots = props["total_slots"]
        unified = fs.flags.unified if fs.flags is not None else True
        live = LiveServer(fs, server, n_ctx_slot, total_slots, unified)
        self.live[fs.name] = live
        self.launches.append(Launch(fs.name, tuple(server.command), round(load_s, 3), n_ctx_slot, total_slots,
                                    props["build_info"]))
        self._say(f"{fs.name} ready in {load_s:.1f} s (context {n_ctx_slot} per slot, {total_slots} slot(s))")
        return live

    def down(self, name: str) -> None:
        live = self.live.pop(name, None)
        if live is not None:
            live.server.stop()
            if self.log_dir is None:
                live.server.cleanup_log()

    def close(self) -> None:
        for name in list(self.live):
            self.down(name)

    def __enter__(self) -> ServerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def get_props(server: LlamaServer) -> dict[str, Any]:
    """llama-server's ``/props`` (slots, context per slot, build), checked (:data:`tuner.llama_api.PROPS`)."""
    return server.request("GET", "/props", PROPS, timeout_s=30.0)


def tokenizer_of(server: LlamaServer) -> Callable[[str], list[int]]:
    def tokenize(text: str) -> list[int]:
        reply = server.post("/tokenize", {"content": text, "add_special": False}, schema=TOKENIZE)
        return list(reply["tokens"])

    return tokenize

"""A fake llama-server that misbehaves on purpose, for tests: ``python fakellama.py MODE [llama-server arguments]``.

tests/test_hostile_processes.py writes one executable per mode (``#!/bin/sh`` + ``exec python fakellama.py MODE
"$@"``) and hands it to tuner as ``--server-bin``. Every mode answers ``--version`` as llama.cpp does unless the
mode is about ``--version``; the others then listen on ``--host``/``--port`` like llama-server (its HTTP server comes
up before the model is loaded) and answer as the mode says:

* ``garbage-version``: ``--version`` prints noise with escape sequences and no ``version:`` line;
* ``huge-version``: ``--version`` prints 8 MiB;
* ``version-fails``: ``--version`` exits 3 after an error line;
* ``hangs-on-version``: ``--version`` never returns;
* ``exits-at-once``: logs an error (with an escape sequence) and exits 1 without listening;
* ``never-listens``: logs load lines, never opens its port;
* ``never-healthy``: ``/health`` answers 503 for ever;
* ``non-json``: healthy, then every other endpoint answers an HTML page;
* ``huge-json``: healthy, then a 100 MB JSON document;
* ``deep-json``: healthy, then JSON nested 100,000 deep;
* ``wrong-types``: healthy, then ``completion_tokens: "many"``, ``total_slots: "four"``, token ids that are strings,
  ``timings`` with a negative ``prompt_n``;
* ``no-tokens``: healthy, completes with 0 tokens;
* ``error-500``: healthy, then HTTP 500 with a body holding escape sequences;
* ``forks-and-exits``: forks a child that serves healthy answers (as a daemonizing wrapper would), and exits 0;
* ``dies-while-loading``: ``/health`` 503 for a moment, then "CUDA error: out of memory" and exit 134;
* ``floods-log-then-dies``: writes 16 MiB of log lines, then 8 GiB more (a hole: no disk used), then
  "error loading model" and exits 1;
* ``floods-log-while-loading``: never listens; its log grows by 64 MiB (a line, then a hole) every 10 ms;
* ``healthy``: answers like llama-server (used for bench's ``/props``-only modes below);
* ``props-non-json`` / ``props-wrong-types`` / ``tokenize-wrong-types`` / ``timings-negative``: healthy, one
  endpoint bad (what ``tuner bench`` reads).

Only the standard library: it runs under the same memory limit as tuner in the hostile suite.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VERSION = "version: 9999 (0c1e570)\nbuilt with fake for testing\n"
ESC = "\x1b[31mRED\x1b[0m\x07"


def log(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def arg(args: list[str], name: str, default: str) -> str:
    return args[args.index(name) + 1] if name in args and args.index(name) + 1 < len(args) else default


def main() -> int:
    mode, args = sys.argv[1], sys.argv[2:]
    if "--version" in args:
        if mode == "garbage-version":
            sys.stdout.write(f"{ESC} hello [/bold] \x00\x01 not a llama\n")
            return 0
        if mode == "huge-version":
            chunk = "x" * 1023 + "\n"
            for _ in range(8 * 1024):
                sys.stdout.write(chunk)
            return 0
        if mode == "hangs-on-version":
            while True:
                time.sleep(1)
        if mode == "version-fails":
            sys.stdout.write(f"error while loading shared libraries: libcuda.so.1 {ESC}\n")
            return 3
        sys.stdout.write(VERSION)
        return 0
    log("main: fake llama-server starting")
    if mode == "exits-at-once":
        log(f"error loading model: {ESC} the fake cannot load anything")
        return 1
    if mode.startswith("floods-log"):
        return flood(mode)
    if mode == "never-listens":
        log("llama_model_loader: loaded meta data")
        while True:
            time.sleep(1)
    if mode == "forks-and-exits":
        if os.fork() > 0:
            log("fake wrapper: forked llama-server, exiting")
            os._exit(0)
        mode = "healthy"
    serve(mode, arg(args, "--host", "127.0.0.1"), int(arg(args, "--port", "8080")))
    return 0


def flood(mode: str) -> int:
    """Write far more log than any reader should hold: real lines, then holes (seeking stdout, the log file tuner
    opened, past its end), so that the test's disk holds little of what the log claims."""
    sys.stdout.flush()
    line = b"load_tensors: loading model tensors, this can take a while... (mmap = true) " * 8 + b"\n"
    if mode == "floods-log-then-dies":
        chunk = line * ((1 << 20) // len(line))
        for _ in range(16):
            os.write(1, chunk)
        os.lseek(1, 8 << 30, os.SEEK_CUR)
        os.write(1, f"\nerror loading model: the fake flooded its log {ESC}\n".encode())
        return 1
    while True:
        os.write(1, line)
        os.lseek(1, 64 << 20, os.SEEK_CUR)
        time.sleep(0.01)


def serve(mode: str, host: str, port: int) -> None:
    started = time.monotonic()

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *a: object) -> None:
            pass

        def send(self, status: int, body: bytes, ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def send_json(self, obj: object) -> None:
            self.send(200, json.dumps(obj).encode())

        def do_GET(self) -> None:
            self.answer()

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.answer()

        def answer(self) -> None:
            path = self.path.split("?", 1)[0]
            if path == "/health":
                if mode == "never-healthy" or (mode == "dies-while-loading" and time.monotonic() - started < 0.5):
                    self.send(503, b'{"error": {"message": "Loading model"}}')
                elif mode == "dies-while-loading":
                    log("CUDA error: out of memory")
                    os._exit(134)
                else:
                    self.send(200, b'{"status": "ok"}')
                return
            if mode == "non-json" or (mode == "props-non-json" and path == "/props"):
                self.send(200, b"<html><body>Welcome to the captive portal</body></html>", "text/html")
            elif mode == "huge-json":
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(100 * 2**20 + 2))
                self.end_headers()
                self.wfile.write(b"[")
                chunk = b"0," * (2**19)
                try:
                    for _ in range(100):
                        self.wfile.write(chunk)
                    self.wfile.write(b"0]")
                except OSError:
                    pass
            elif mode == "deep-json":
                self.send(200, b"[" * 100_000 + b"]" * 100_000)
            elif mode == "error-500":
                self.send(500, f"server exploded {ESC}".encode(), "text/plain")
            elif path == "/props":
                bad = mode in ("wrong-types", "props-wrong-types")
                self.send_json({"default_generation_settings": {"n_ctx": 4096}, "total_slots": "four" if bad else 1,
                                "build_info": "b9999-fake"})
            elif path == "/tokenize":
                text_tokens = ["a", "b"] if mode in ("wrong-types", "tokenize-wrong-types") else list(range(64))
                self.send_json({"tokens": text_tokens})
            elif path == "/completion":
                prompt_n = -5 if mode in ("wrong-types", "timings-negative") else 8
                self.send_json({"content": "x", "timings": {
                    "prompt_n": prompt_n, "cache_n": 0, "prompt_ms": 1.0, "predicted_n": 4, "predicted_ms": 1.0,
                    "prompt_per_second": 100.0, "predicted_per_second": 100.0}})
            elif path == "/v1/chat/completions":
                tokens: object = "many" if mode == "wrong-types" else 0 if mode == "no-tokens" else 2
                self.send_json({"choices": [{"message": {"content": "hi"}}], "usage": {"completion_tokens": tokens}})
            elif path == "/metrics":
                self.send(200, b"llamacpp:tokens_predicted_total 0\n", "text/plain")
            else:
                self.send(404, b'{"error": "not found"}')

    server = ThreadingHTTPServer((host, port), Handler)
    server.daemon_threads = True
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    log("main: server is listening")
    server.serve_forever(poll_interval=0.1)


if __name__ == "__main__":
    sys.exit(main())

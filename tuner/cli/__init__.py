"""The ``tuner`` command line: thin typer commands over the package's layers.

Errors from any layer arrive as :class:`tuner.errors.TunerError` and leave here, in :func:`main`, as one line on
stderr and a non-zero exit code; nothing below the CLI prints or exits.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Annotated

# huggingface_hub 2.x asks the endpoint about "agent harnesses" on its first call (3 s timeout): tuner only wants
# the repo listing and files, so keep it quiet and fast (set before huggingface_hub is imported anywhere).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
# Its retry warnings ("Retrying in 4s [Retry 3/5]") would go to stderr line by line; tuner reports a failed
# download once, as one line, when the retries are spent.
os.environ.setdefault("HF_HUB_VERBOSITY", "error")

import typer

from tuner.errors import TunerError

app = typer.Typer(
    name="tuner",
    help="Size, plan, build, serve and benchmark llama.cpp for the Qwen3.5 / Qwen3.6 hybrid models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"tuner {version('tuner')}")
        raise typer.Exit()


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                               help="Print the installed tuner's version and exit.")] = False,
) -> None:
    """Size, plan, build, serve and benchmark llama.cpp for the Qwen3.5 / Qwen3.6 hybrid models."""


# One module per command (each has a ``register(app)``), in the order ``tuner --help`` lists them.
COMMANDS: dict[str, str] = {
    "estimate": "tuner.cli.estimate",
    "recommend": "tuner.cli.recommend",
    "build": "tuner.cli.build",
    "serve": "tuner.cli.serve",
    "worker": "tuner.cli.worker",
    "bench": "tuner.cli.bench",
    "calibrate": "tuner.cli.calibrate",
    "profile": "tuner.cli.profile",
    "hardware": "tuner.cli.hardware",
}
_registered: set[str] = set()


def _register(argv: list[str]) -> None:
    """Import only the command being run (all of them for help or a typo, none for ``--version``): every command
    module pulls in its own layers, and a start-up that imports all of them costs more than a whole
    ``tuner estimate``."""
    import importlib

    first = next((a for a in argv if not a.startswith("-")), None)
    if first is None and "--version" in argv:
        return
    names = [first] if first in COMMANDS else list(COMMANDS)
    for name in names:
        if name not in _registered:
            importlib.import_module(COMMANDS[name]).register(app)
            _registered.add(name)


@contextmanager
def stop_signals() -> Iterator[None]:
    """SIGINT and SIGTERM become one KeyboardInterrupt (the first one); later ones are ignored, so a second Ctrl-C
    cannot cut short the orderly stop of what tuner started (llama-server, a build's compilers). Without this,
    SIGTERM would end tuner at once, leaving its children running."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum: int, frame: FrameType | None) -> None:
        nonlocal fired
        if fired:
            return
        fired = True
        raise KeyboardInterrupt

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning TunerError (and Ctrl-C) into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        _register(args)
        # Not standalone, newer typer returns (not raises) the code of a ``typer.Exit`` and turns Ctrl-C into
        # Exit(130); older releases raise Abort from the KeyboardInterrupt. Our commands themselves return None.
        result = app(args=args, standalone_mode=False)
    except TunerError as exc:
        sys.stderr.write(f"tuner: error: {_visible(exc.one_line())}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        return _interrupted()
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort as exc:
        if isinstance(exc.__cause__ or exc.__context__, KeyboardInterrupt):
            return _interrupted()
        sys.stderr.write("tuner: aborted\n")
        return 1
    except Exception as exc:  # usage errors and anything unexpected: still one line, no traceback
        if _is_usage_error(exc):
            message = exc.format_message()  # type: ignore[attr-defined]
            if message:  # empty for "no arguments, so help": the help is already printed
                sys.stderr.write(f"tuner: error: {message}\n")
            return int(exc.exit_code)  # type: ignore[attr-defined]
        sys.stderr.write(f"tuner: internal error: {type(exc).__name__}: {_visible(' '.join(str(exc).split()))}\n")
        return 70
    if isinstance(result, int) and not isinstance(result, bool) and result != 0:
        return _interrupted() if result == 130 else result
    return 0


def _is_usage_error(exc: Exception) -> bool:
    """A click usage error (bad option, bad value …): click's own class, or that of the copy of click that newer
    typer releases vendor (typer 0.29 here), whose exceptions are not click's."""
    classes: list[type] = [c for c in (getattr(typer, "TyperException", None),) if isinstance(c, type)]
    try:  # not a dependency of every typer release
        import click

        classes.append(click.exceptions.ClickException)
    except ImportError:
        pass
    return isinstance(exc, tuple(classes)) and callable(getattr(exc, "format_message", None))


def _visible(line: str) -> str:
    """An error line as text: a file name or Hub value quoted in it cannot send escape sequences to the terminal."""
    from tuner.untrusted import visible

    return visible(line)


def _interrupted() -> int:
    sys.stderr.write("tuner: interrupted\n")
    return 130


def run() -> None:
    sys.exit(main())

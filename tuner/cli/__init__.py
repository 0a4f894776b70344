"""The ``tuner`` command line: thin typer commands over the package's layers.

Errors from any layer arrive as :class:`tuner.errors.TunerError` and leave here, in :func:`main`, as one line on
stderr and a non-zero exit code; nothing below the CLI prints or exits.
"""

from __future__ import annotations

import os
import sys

# huggingface_hub 2.x asks the endpoint about "agent harnesses" on its first call (3 s timeout): tuner only wants
# the repo listing and files, so keep it quiet and fast (set before huggingface_hub is imported anywhere).
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import typer

from tuner.errors import TunerError

app = typer.Typer(
    name="tuner",
    help="Size, plan, build, serve and benchmark llama.cpp for the Qwen3.5 / Qwen3.6 hybrid models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Size, plan, build, serve and benchmark llama.cpp for the Qwen3.5 / Qwen3.6 hybrid models."""


# One module per command (each has a ``register(app)``), in the order ``tuner --help`` lists them.
COMMANDS: dict[str, str] = {
    "estimate": "tuner.cli.estimate",
    "recommend": "tuner.cli.recommend",
    "build": "tuner.cli.build",
    "serve": "tuner.cli.serve",
    "bench": "tuner.cli.bench",
    "profile": "tuner.cli.profile",
    "hardware": "tuner.cli.hardware",
}
_registered: set[str] = set()


def _register(argv: list[str]) -> None:
    """Import only the command being run (all of them for help or a typo): every command module pulls in its
    own layers, and a start-up that imports all of them costs more than a whole ``tuner estimate``."""
    import importlib

    first = next((a for a in argv if not a.startswith("-")), None)
    names = [first] if first in COMMANDS else list(COMMANDS)
    for name in names:
        if name not in _registered:
            importlib.import_module(COMMANDS[name]).register(app)
            _registered.add(name)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning TunerError (and Ctrl-C) into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        _register(args)
        app(args=args, standalone_mode=False)
    except TunerError as exc:
        sys.stderr.write(f"tuner: error: {exc.one_line()}\n")
        return exc.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("tuner: interrupted\n")
        return 130
    except typer.Exit as exc:
        return int(exc.exit_code or 0)
    except typer.Abort:
        sys.stderr.write("tuner: aborted\n")
        return 1
    except Exception as exc:  # click usage errors and anything unexpected: still one line, no traceback
        import click

        if isinstance(exc, click.exceptions.ClickException):
            sys.stderr.write(f"tuner: error: {exc.format_message()}\n")
            return exc.exit_code
        sys.stderr.write(f"tuner: internal error: {type(exc).__name__}: {exc}\n")
        return 70
    return 0


def run() -> None:
    sys.exit(main())

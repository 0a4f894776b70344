"""The ``tuner`` command line: thin typer commands over the package's layers.

Errors from any layer arrive as :class:`tuner.errors.TunerError` and leave here, in :func:`main`, as one line on
stderr and a non-zero exit code; nothing below the CLI prints or exits.
"""

from __future__ import annotations

import sys

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


def _register() -> None:
    from tuner.cli import estimate, hardware

    estimate.register(app)
    hardware.register(app)


_register()


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turning TunerError (and Ctrl-C) into one line and an exit code."""
    try:
        app(args=argv, standalone_mode=False)
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

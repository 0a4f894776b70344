"""``tuner profile``: what this machine measured — ``tuner bench``'s speeds, and the calibration points of ``tuner
serve`` and ``tuner calibrate`` — which ``tuner recommend`` and ``tuner estimate`` read.

The profile lives in ``profiles.yaml`` under tuner's config folder (``TUNER_CONFIG_DIR`` moves it). One entry per
GGUF file × GPU models and driver × llama.cpp build, and the calibration points beside them; see
:mod:`tuner.profile_store` and, for what the points correct, :mod:`tuner.corrections`.

Examples:

    tuner profile show                 # entries, best flags, measured tok/s and roofline efficiency
    tuner profile show --json
    tuner profile export profile.yaml  # a copy (YAML); no PATH: print it
    tuner profile reset --yes          # forget everything measured
"""

from __future__ import annotations

import shlex
import statistics
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from tuner.build import current_build
from tuner.cli import _options as o
from tuner.cli._output import emit, text, warn
from tuner.corrections import Calibration
from tuner.errors import TunerError
from tuner.hardware import Hardware
from tuner.paths import write_atomic
from tuner.profile_store import ProfileEntry, ProfileStore, load_calibration, measured_hook
from tuner.untrusted import visible


def recommend_hook(hardware: Hardware, server_bin: str | None = None) -> Any:
    """The planner's ``measured`` hook for ``tuner recommend`` (the profile of this machine and build); None when
    the profile cannot be read: then one warning line names the file and how to reset it, and the roofline stands
    alone. A ``--server-bin`` that is no llama-server is refused (TunerError): the plan's command would name it."""
    if server_bin:
        build = current_build(server_bin)
    else:
        try:
            build = current_build()
        except TunerError:
            return None
    try:
        return measured_hook(hardware, build)
    except TunerError as error:
        warn(f"{error.one_line()}; planning without measured speeds")
        return None


def calibration_for(hardware: Hardware, server_bin: str | None = None) -> Calibration | None:
    """The calibration that applies on ``hardware`` with the build that would run (this machine's points, else the
    shipped files'); None when there is none or the profile cannot be read. A calibration file that does not read
    is one warning line naming it, and planning goes on without it."""
    try:
        return load_calibration(hardware, current_build(server_bin), on_skip=warn) or None
    except TunerError:
        return None


def entry_summary(e: ProfileEntry) -> dict[str, Any]:
    best = e.best
    tg_eff, pp_eff = e.efficiencies()
    return {
        "id": e.key.id(),
        "model": e.key.model.to_dict(),
        "hardware": e.key.hardware.to_dict(),
        "build": e.key.build.to_dict(),
        "updated_at": e.updated_at,
        "measurements": len(e.measurements),
        "best": best.to_dict() if best else None,
        "tg_efficiency_median": round(statistics.median(tg_eff), 4) if tg_eff else None,
        "pp_efficiency_median": round(statistics.median(pp_eff), 4) if pp_eff else None,
        "memory_observations": [dict(x) for x in e.memory_observations],
    }


def calibration_rows(points: list[Any]) -> list[dict[str, Any]]:
    """The store's calibration points grouped by device (memory) or hardware (speed) and build."""
    from tuner.corrections import MemoryPoint

    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for p in points:
        memory = isinstance(p, MemoryPoint)
        key = ("memory" if memory else "speed", p.device if memory else p.hardware, p.build)
        g = groups.setdefault(key, {"kind": key[0], "device": key[1], "build": key[2], "points": 0, "shapes": set(),
                                    "sources": set(), "last": ""})
        g["points"] += 1
        g["shapes"].add(p.shape)
        g["sources"].add(p.source)
        g["last"] = max(g["last"], p.observed_at)
    return [{**g, "shapes": sorted(g["shapes"]), "sources": sorted(g["sources"])} for g in groups.values()]


def render_show(console: Console, result: dict[str, Any]) -> None:
    console.print(f"profile: {visible(result['path'])}", highlight=False, markup=False)
    if result.get("calibration"):
        table = Table(title="calibration points (tuner serve, tuner calibrate)", title_justify="left")
        for col in ("kind", "device", "llama.cpp", "points", "shapes", "from", "last"):
            table.add_column(col, justify="right" if col == "points" else "left")
        for g in result["calibration"]:
            table.add_row(g["kind"], text(g["device"]), text(g["build"][:12]), str(g["points"]),
                          text(", ".join(g["shapes"])), text(", ".join(g["sources"])), text(g["last"]))
        console.print(table)
    if not result["entries"]:
        console.print("nothing measured yet: run `tuner bench`")
        return
    for e in result["entries"]:
        model = e["model"]
        console.print()
        console.print(f"[bold]{text(model['name'])}[/bold] ({model['file_bytes']:,} bytes"
                      + (f", {text(model['repo'])}@{text((model['revision'] or '')[:12])}" if model.get("repo")
                         else "") + ")")
        hw = e["hardware"]
        console.print(f"  on {text(' + '.join(hw['gpus']) or 'CPU ' + str(hw['cpu']))}"
                      + (f", driver {text(hw['driver'])}" if hw.get("driver") else "")
                      + f"; llama.cpp {text(e['build']['commit'][:12])}{' CUDA' if e['build']['cuda'] else ''}; "
                      f"{e['measurements']} measurement(s), updated {text(e['updated_at'])}", highlight=False)
        best = e["best"]
        if best:
            console.print(f"  best at depth {best['depth']}: [bold]{text(best['set_name'])}[/bold] — tg "
                          f"{best['tg_tok_s']:,.1f} tok/s, pp {best['pp_tok_s']:,.1f} tok/s", highlight=False)
            console.print(f"    llama-server {visible(shlex.join(best['args']))}", highlight=False, markup=False,
                          soft_wrap=True)
        if e["tg_efficiency_median"] is not None:
            console.print(f"  roofline efficiency (measured / bound), median: tg {e['tg_efficiency_median']:.3f}"
                          + (f", pp {e['pp_efficiency_median']:.3f}" if e["pp_efficiency_median"] else ""))
        if e["memory_observations"]:
            table = Table(title="  memory observed by tuner serve (reported − estimated)", title_justify="left")
            for col in ("observed", "weights", "kv", "recurrent", "compute", "beyond tolerance"):
                table.add_column(col, justify="left" if col in ("observed", "beyond tolerance") else "right")
            for obs in e["memory_observations"]:
                kinds = obs.get("kinds", {})

                def diff(k: str, kinds: dict[str, Any] = kinds) -> str:
                    d = (kinds.get(k) or {}).get("diff_bytes")
                    return f"{d / 2**20:+,.1f} MiB" if isinstance(d, int | float) else "-"

                table.add_row(text(obs.get("observed_at") or ""), diff("weights"), diff("kv"), diff("recurrent"),
                              diff("compute"), ", ".join(obs.get("mismatches") or []) or "none")
            console.print(table)


def register(app: typer.Typer) -> None:
    profile_app = typer.Typer(name="profile", help="The measured-speed profile that `tuner recommend` reads.",
                              no_args_is_help=True)
    app.add_typer(profile_app, name="profile")

    @profile_app.command("show")
    def show_cmd(as_json: o.JsonOpt = False) -> None:
        """Show what was measured: per model file, hardware and build, the best flags and tok/s."""
        store = ProfileStore()
        problems: list[str] = []
        try:
            store.absorb_observations(problems=problems)
            absorb_error = None
        except TunerError as error:
            absorb_error = error
        entries = sorted(store.load(), key=lambda e: e.updated_at, reverse=True)  # a corrupt profile stops here
        if absorb_error is not None:  # a read-only config folder: show what there is
            warn(f"{absorb_error.one_line()}; showing the profile without tuner serve's latest observations")
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            warn(f"skipped an observation file tuner cannot use: {problems[0]}{more}; delete it")
        result = {"path": str(store.path), "entries": [entry_summary(e) for e in entries],
                  "calibration": calibration_rows(store.load_points())}
        emit(result, as_json=as_json, render=lambda c: render_show(c, result))

    @profile_app.command("export")
    def export_cmd(
        path: Annotated[Path | None, typer.Argument(help="Write here (YAML); default: print it.",
                                                    show_default=False)] = None,
        as_json: o.JsonOpt = False,
    ) -> None:
        """Export the profile as YAML (or JSON with --json), to PATH or stdout."""
        store = ProfileStore()
        if path is not None and path.is_dir():
            raise TunerError(f"{path} is a folder: name the file to export to, e.g. {path / 'profile.yaml'}")
        if path is not None and not as_json:
            written = store.export(path)
            sys.stderr.write(f"profile exported to {visible(str(written))}\n")
            return
        data = {"format": 2, "entries": [e.to_dict() for e in store.load()],
                "calibration": [p.to_dict() for p in store.load_points()]}
        if as_json:
            import json

            body = json.dumps(data, indent=2) + "\n"
        else:
            body = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=120)
        if path is not None:
            try:
                written = write_atomic(path, body)
            except OSError as error:
                raise TunerError(f"cannot write {path}: {error.strerror or error}") from None
            sys.stderr.write(f"profile exported to {visible(str(written))}\n")
        else:
            sys.stdout.write(body)

    @profile_app.command("reset")
    def reset_cmd(yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask.")] = False) -> None:
        """Forget every measurement and calibration (removes the profile file and tuner serve's observations)."""
        store = ProfileStore()
        if not yes:
            if not sys.stdin.isatty():
                raise TunerError(f"this removes {store.path}; add --yes to confirm")
            typer.confirm(f"Remove {store.path}?", abort=True)
        removed = store.reset()
        sys.stderr.write(f"profile {'removed' if removed else 'was already empty'}: {store.path}\n")

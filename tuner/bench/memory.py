"""Whether bench's servers fit: each set on its own against the planner's budget, and all of them side by side."""

from __future__ import annotations

from collections.abc import Sequence

from tuner.bench.flagsets import FlagSet, load_mode, uses_fit
from tuner.devices import CPU
from tuner.errors import TunerError
from tuner.estimate import MemoryEstimate
from tuner.flags import FLAGS, ServerFlags, flag_value
from tuner.hardware import Hardware, gpu_split
from tuner.layout import ModelLayout
from tuner.planner import Budget, Wishes, budget_for, estimate_on, fits, headroom_bytes
from tuner.units import fmt_bytes

#: load modes whose weights live in the page cache, shared by every server of the same file (common/arg.cpp:2691-2705)
_MAPPED_LOAD_MODES = ("auto", "mmap")


def estimate_for(layout: ModelLayout, fs: FlagSet, hardware: Hardware) -> MemoryEstimate:
    """The estimate of a set; a ``--fit`` set is estimated as llama-server's defaults would start. A set that names
    an MTP sidecar (``-md``) is estimated with it."""
    flags = fs.flags or ServerFlags()
    sidecar = flag_value(fs.args, "spec_draft_model")
    if not sidecar:
        return estimate_on(layout, flags, hardware)
    from tuner.estimate import estimate_memory
    from tuner.models import local_layout
    from tuner.placement import devices_of

    return estimate_memory(layout, flags, devices_of(hardware), gpu_split(hardware),
                           draft=local_layout(str(sidecar)))


def default_budget(hardware: Hardware) -> Budget:
    """The planner's budget with its default buffer (VRAM, or RAM when there is no GPU)."""
    return budget_for(hardware, Wishes())


def host_bytes(estimate: MemoryEstimate) -> int:
    """Host RAM a server needs beside others: its CPU buffers and checkpoints. The prompt cache (``--cache-ram``)
    is an upper bound that grows only with distinct prompts; a benchmark sends few, so it is left out here."""
    return estimate.host.total_bytes + estimate.checkpoints_bytes


def fit_problem(estimate: MemoryEstimate, budget: Budget) -> str | None:
    """Why one server does not fit the planner's budget (:func:`tuner.planner.fits`), or None."""
    if fits(estimate, budget):
        return None
    short = {k: -v for k, v in headroom_bytes(estimate, budget).items() if v < 0}
    return "; ".join(f"{'RAM' if dev == CPU else dev} is {fmt_bytes(n)} short" for dev, n in short.items()) + \
        f" (buffer {fmt_bytes(budget.buffer_bytes)})"


def memory_problem(estimates: Sequence[tuple[FlagSet, MemoryEstimate]], budget: Budget) -> str | None:
    """Why these servers would not fit side by side in ``budget`` (None if they do).

    GPUs: the sum per device must stay the buffer below its free memory. Host: the sum of host buffers
    (:func:`host_bytes`) must fit the available RAM (less the buffer when there is no GPU); weights mapped from the
    file (load mode auto/mmap) live in the page cache, which the servers share, so they count once.
    """
    for name, free in budget.gpu_free_bytes:
        need = sum(est.device(name).total_bytes for _, est in estimates)
        room = free - budget.buffer_bytes
        if need > room:
            return (f"{name} would need {fmt_bytes(need)}, {fmt_bytes(max(room, 0))} is free "
                    f"after the {fmt_bytes(budget.buffer_bytes)} buffer")
    mapped = [est.host.weights_bytes for fs, est in estimates if load_mode(fs.args) in _MAPPED_LOAD_MODES]
    need_host = sum(host_bytes(est) for _, est in estimates) - sum(mapped) + max(mapped, default=0)
    room_host = budget.ram_available_bytes - (budget.buffer_bytes if budget.cpu_only else 0)
    if need_host > room_host:
        return f"host RAM would need {fmt_bytes(need_host)}, {fmt_bytes(max(room_host, 0))} is available"
    return None


def check_sets_fit(layout: ModelLayout, sets: Sequence[FlagSet], hardware: Hardware,
                   budget: Budget) -> dict[str, MemoryEstimate]:
    """Estimate every set and refuse (TunerError) one whose estimate does not fit the budget on its own.

    A set that leaves sizing to ``--fit`` (:func:`uses_fit`) is not refused: llama-server shrinks it at launch.
    """
    out: dict[str, MemoryEstimate] = {}
    for fs in sets:
        try:
            est = estimate_for(layout, fs, hardware)
        except TunerError as exc:
            raise TunerError(f"set {fs.name!r}: {exc}") from None
        if not uses_fit(fs.args, bool(hardware.gpus)):
            problem = fit_problem(est, budget)
            if problem:
                raise TunerError(f"set {fs.name!r} does not fit: {problem}; change its flags or the budget")
        out[fs.name] = est
    return out


def check_slots(sets: Sequence[FlagSet], concurrency: int) -> None:
    """Refuse (TunerError), before anything is launched, a set with fewer slots than ``concurrency`` (a set that
    does not say ``-np`` gets llama-server's auto). :func:`tuner.bench.measure.measure_once` checks again with what
    the server says."""
    for fs in sets:
        slots = (fs.flags or ServerFlags()).n_seq
        if slots < concurrency:
            raise TunerError(f"set {fs.name!r} has {slots} slot(s); --concurrency {concurrency} needs "
                             f"{FLAGS['parallel'].aliases[0]} {concurrency} or more")


def decide_together(layout: ModelLayout, sets: Sequence[FlagSet], hardware: Hardware, budget: Budget,
                    estimates: dict[str, MemoryEstimate] | None = None) -> tuple[bool, str]:
    """Whether all sets' servers can be up at once, and why (see :mod:`tuner.bench.run`)."""
    if len(sets) < 2:
        return True, "one set"
    if hardware.gpus and any(uses_fit(fs.args) for fs in sets):
        return False, f"a set sizes itself with {FLAGS['fit'].long} to the free GPU memory, so it runs alone"
    estimates = estimates or {fs.name: estimate_for(layout, fs, hardware) for fs in sets}
    problem = memory_problem([(fs, estimates[fs.name]) for fs in sets], budget)
    if problem:
        return False, f"the sets do not fit side by side ({problem})"
    return True, "all sets fit side by side"

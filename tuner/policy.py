"""The default planning policy, ``balanced``: what a llama.cpp user who knows these models would pick.

The rule, over the options the planner's search found (quant × KV cache type × context tier, each placed with the
fewest expert layers in RAM that reach its tier and then grown to the most context that placement holds):

1. **Floors.** Quality of the Q4_K_M class (:func:`meets_quality_floor`: a quant labelled Q4_K_M/L/XL, or at least
   :data:`QUALITY_FLOOR_BITS_PER_WEIGHT` bits per weight) and :data:`CTX_FLOOR` tokens per slot (64K: a thinking
   model's tool loop fills 32K in a few turns). An explicit ``--quant`` or ``--ctx-size`` replaces its floor.
2. **Reference.** The fastest predicted generation among the options that meet both floors.
3. **Window.** Every floor-meeting option within :data:`SPEED_WINDOW` (10%) of that reference counts as fast
   enough: the speed model is no more accurate than that (tuner/speed.py's fit), and 10% of generation is less
   than a user notices.
4. **Within the window, in this order:** the higher context tier (:func:`ctx_tiers`: the floor, doubled up to the
   native context; 10% short of a tier above the floor counts as reaching it), the better quant, more context by
   half-octaves (:meth:`Floors.ctx_step`: 201K tokens with a q8_0 cache beat 130K with f16 on a 24 GB card), the
   more exact KV cache, then speed, then context. Every option is compared as it would be launched (the planner
   raises the ubatch of those near the window first, tuner/planner.py's ``raise_ubatch``). Context comes before
   quant: doubling the context is what lets an agent loop keep going, while above Q4_K_M a better quant changes
   perplexity by a few percent. Without a GPU a quantized KV cache counts only up to the context floor: on the CPU
   backend it cut prompt speed to a third where we measured it
   (bench_results/mid-qwen35moe/cpu-amd-epyc/20261123T161203150194Z.json), which a generation window does not see.
5. **When a floor cannot be met** the plan gives up as little as it must, with a warning: if some quant reaches the
   context floor, the best quant that does (quality is given up, context kept); if none does, the highest context
   tier, then the best quant, with no speed window.

Pure functions over the planner's options (anything with the :class:`Option` attributes); nothing here searches:
where the rule needs more options placed (:func:`climb_tiers`) or an option as it would be launched
(:func:`rank_as_planned`), the planner passes its search in.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from tuner.candidate import QuantCandidate

BALANCED = "balanced"
CTX_FLOOR = 65536
"""Tokens per slot a balanced plan keeps wherever the hardware holds them."""
QUALITY_FLOOR_QUANT = "Q4_K_M"
QUALITY_FLOOR_BITS_PER_WEIGHT = 4.75
"""Q4_K_M is 4.86-4.92 bits per weight on the Qwen3.5 cards (llama-quantize's recipe, profiles/models/*.yaml);
IQ4_XS (4.29-4.48) and Q4_K_S (~4.6) fall below, every Q5 and above and the uploaders' Q4_K_XL mixes above."""
SPEED_WINDOW = 0.10
"""Generation within this fraction of the fastest floor-meeting plan counts as equally fast."""
CTX_TIER_SLACK = 0.10
"""A context within this fraction under a tier above the floor counts as reaching it: like the speed window, a
difference the user does not feel (262,144 vs 243,712 tokens) does not outrank speed."""
_FLOOR_LABEL = re.compile(r"^(?:UD-)?Q4_K_(?:M|L|XL)$", re.IGNORECASE)


class Option(Protocol):
    """What the policy reads of a planner option."""

    @property
    def candidate(self) -> QuantCandidate: ...
    @property
    def ctx(self) -> int: ...
    @property
    def tg(self) -> float: ...
    @property
    def quant_quality(self) -> int: ...
    @property
    def kv_quality(self) -> int: ...
    @property
    def kv(self) -> str: ...
    @property
    def bpw(self) -> float: ...
    @property
    def experts_on_cpu(self) -> int: ...
    @property
    def flags(self) -> Any: ...  # tuner.flags.ServerFlags
    @property
    def floor(self) -> int: ...  # the context per slot its placement was searched at


_O = TypeVar("_O", bound=Option)


def meets_quality_floor(cand: QuantCandidate) -> bool:
    """Q4_K_M-class or better: labelled Q4_K_M (or an uploader's Q4_K_L/XL mix of it), or at least
    :data:`QUALITY_FLOOR_BITS_PER_WEIGHT` bits per weight."""
    return bool(_FLOOR_LABEL.match(cand.quant)) or cand.bits_per_weight >= QUALITY_FLOOR_BITS_PER_WEIGHT


def quality_gap(alt: Option, best: Option) -> str:
    """Why ``alt``'s quant counts as worse than ``best``'s, in a parenthesis: fewer bits per weight, or, where it has
    more, the card's quality order (measured perplexity ranks unsloth's UD-Q4_K_XL below Q4_K_M on the 35B-A3B,
    profiles/models/qwen3.5-35b-a3b.yaml)."""
    bits = f"{alt.bpw:.2f} vs {best.bpw:.2f} bits/weight"
    return f"({bits})" if alt.bpw < best.bpw else f"({bits}, but ranked below it by the card's quality order)"


def ctx_tiers(floor: int, cap: int) -> tuple[int, ...]:
    """The context tiers a balanced plan climbs: ``floor``, doubled while below ``cap``, and ``cap`` itself
    (65536, 131072, 262144 for a 262K-native model)."""
    tiers = []
    t = floor
    while t < cap:
        tiers.append(t)
        t *= 2
    tiers.append(cap)
    return tuple(dict.fromkeys(tiers))


def tier_of(ctx: int, tiers: Sequence[int]) -> int:
    """The highest tier ``ctx`` reaches, above the first within :data:`CTX_TIER_SLACK` (243,712 tokens count as the
    262,144 tier); below the lowest tier, the power of two at or under it."""
    reached = [t for i, t in enumerate(tiers) if ctx >= (t if i == 0 else (1 - CTX_TIER_SLACK) * t)]
    if reached:
        return max(reached)
    return 1 << (max(ctx, 1).bit_length() - 1)


@dataclass(frozen=True)
class Floors:
    """The floors of one planning run: the context per slot and whether the quality floor applies."""

    ctx: int
    tiers: tuple[int, ...]
    quality: bool = True  # False when --quant named the quant
    ctx_asked: bool = False  # True when --ctx-size named the context
    cpu_only: bool = False

    def quality_ok(self, o: Option) -> bool:
        return not self.quality or meets_quality_floor(o.candidate)

    def ctx_ok(self, o: Option) -> bool:
        return o.ctx >= self.ctx

    def tier(self, o: Option) -> int:
        t = tier_of(o.ctx, self.tiers)
        if self.cpu_only and o.kv_quality < _EXACT_KV_QUALITY:  # see the module doc, rule 4
            t = min(t, self.ctx)
        return t

    def ctx_step(self, o: Option) -> int:
        """The half-octave ``o``'s context falls in (√2 apart: 92K, 131K, 185K, …), so that within a tier a
        context clearly larger outranks an exact KV cache, and one a few percent larger does not; the CPU rule of
        :meth:`tier` holds here too."""
        ctx = min(o.ctx, self.ctx) if self.cpu_only and o.kv_quality < _EXACT_KV_QUALITY else o.ctx
        return int(2 * math.log2(max(ctx, 1)))


_EXACT_KV_QUALITY = 6  # f16 (or bf16) for K and V: tuner.planner.KV_QUALITY


@dataclass(frozen=True)
class Choice:
    """The ranked options and how they were judged: the reference speed, the window, the floors met."""

    ranked: tuple[tuple[Option, tuple], ...]  # best first, each with its sort key
    floors: Floors
    reference: Option  # the fastest option of the pool the window is measured from
    window_tg: float  # generation at or above this is within the window (0: no window)
    quality_met: bool
    ctx_met: bool
    warnings: tuple[str, ...] = ()

    @property
    def best(self) -> Option:
        return self.ranked[0][0]

    def in_window(self, o: Option) -> bool:
        return o.tg >= self.window_tg

    def to_dict(self) -> dict[str, object]:
        return {"name": BALANCED, "ctx_floor": self.floors.ctx,
                "quality_floor": QUALITY_FLOOR_QUANT if self.floors.quality else None,
                "ctx_tiers": list(self.floors.tiers), "speed_window": SPEED_WINDOW,
                "reference_tg_tok_s": round(self.reference.tg, 1), "window_tg_tok_s": round(self.window_tg, 1),
                "quality_floor_met": self.quality_met, "ctx_floor_met": self.ctx_met,
                "warnings": list(self.warnings)}


def rank(options: Sequence[Option], floors: Floors) -> Choice:
    """Options best first under the balanced rule (see the module doc); at least one option is needed."""
    if not options:
        raise ValueError("no options to rank")
    both = [o for o in options if floors.ctx_ok(o) and floors.quality_ok(o)]
    reach = [o for o in options if floors.ctx_ok(o)]
    warnings: list[str] = []
    if both:
        pool, windowed = both, True
    elif reach:
        top = max(o.quant_quality for o in reach)
        pool, windowed = [o for o in reach if o.quant_quality == top], True
        warnings.append(f"no {QUALITY_FLOOR_QUANT}-class quant fits with {floors.ctx} tokens of context: "
                        f"{pool[0].candidate.quant} ({pool[0].bpw:.2f} bits/weight) is the best that does")
    else:
        pool, windowed = list(options), False
        most = max(o.ctx for o in options)
        warnings.append(f"nothing reaches {floors.ctx} tokens of context per slot here: the plan takes the most "
                        f"that fits ({most} at best)"
                        + ("" if any(floors.quality_ok(o) for o in options) else
                           f", and no {QUALITY_FLOOR_QUANT}-class quant fits at all"))
    reference = max(pool, key=lambda o: o.tg)
    window_tg = (1 - SPEED_WINDOW) * reference.tg if windowed else 0.0
    in_pool = {id(o) for o in pool}
    chosen = {id(o) for o in pool if o.tg >= window_tg}

    def key(o: Option) -> tuple:
        return (id(o) in chosen, id(o) in in_pool, floors.tier(o) if id(o) in chosen else 0,
                o.quant_quality, floors.ctx_step(o) if id(o) in chosen else 0, o.kv_quality, o.tg, o.ctx)

    ranked = sorted(((o, key(o)) for o in options), key=lambda ok: ok[1], reverse=True)
    return Choice(tuple(ranked), floors, reference, window_tg, bool(both) or not floors.quality,
                  bool(reach), tuple(warnings))


def rule_text(choice: Choice) -> str:
    """The rule as the first reason says it."""
    f = choice.floors
    floors = " and ".join(x for x in (f"{QUALITY_FLOOR_QUANT}-class quality" if f.quality else "",
                                      f"{f.ctx} tokens per slot") if x)
    if choice.window_tg:
        return (f"keeps {floors}, then takes more context (up to {f.tiers[-1]}), a better quant and an exact KV "
                f"cache while generation stays within {SPEED_WINDOW:.0%} of the fastest such plan "
                f"({choice.reference.tg:.0f} tok/s)")
    return f"keeps {floors} where it can; nothing here reaches them, so it takes the most context, then quality"


def why_lost(alt: Option, best: Option, choice: Choice) -> str:
    """Why ``alt`` is not the plan, in one clause."""
    f = choice.floors
    fast = f"{alt.tg:.0f} vs {best.tg:.0f} tok/s predicted"
    cpu = f", experts of {alt.experts_on_cpu} layers in RAM" if alt.experts_on_cpu > best.experts_on_cpu else ""
    if f.quality and not f.quality_ok(alt) and f.quality_ok(best):
        return (f"below the {QUALITY_FLOOR_QUANT}-class quality floor ({alt.candidate.quant}, {alt.bpw:.2f} "
                f"bits/weight; {fast})")
    if not f.ctx_ok(alt) and f.ctx_ok(best):
        return f"below the {f.ctx}-token context floor ({alt.ctx} tokens; {fast})"
    if choice.window_tg and not choice.in_window(alt):
        return (f"slower: {fast}{cpu}, more than {SPEED_WINDOW:.0%} under the fastest plan meeting the floors "
                f"({choice.reference.tg:.0f})")
    ta, tb = f.tier(alt), f.tier(best)
    if ta < tb:
        fastest = " (the fastest plan meeting the floors)" if alt is choice.reference else ""
        return f"less context: {alt.ctx} vs {best.ctx} tokens, for {fast}{fastest}"
    if alt.ctx > best.ctx and alt.tg < best.tg:
        return f"{alt.ctx} tokens, no higher context tier than {best.ctx}, for {fast}"
    if alt.quant_quality < best.quant_quality:
        return f"lower-quality quant {quality_gap(alt, best)} within the speed window ({fast})"
    if f.ctx_step(alt) < f.ctx_step(best):
        return f"less context: {alt.ctx} vs {best.ctx} tokens ({fast})"
    if alt.kv_quality < best.kv_quality:
        return f"quantized KV cache ({alt.kv}) where {best.kv} reaches as far ({fast})"
    if ta > tb:  # only on the CPU: a quantized cache is not credited beyond the floor
        return f"quantized KV cache ({alt.kv}) for more context: on the CPU it slows prompts (measured ÷3)"
    return f"slightly slower: {fast}" if alt.tg < best.tg else f"less context: {alt.ctx} vs {best.ctx} tokens"


def kv_reason(best: Option, alt: Option | None, choice: Choice) -> str:
    """Why the plan's KV cache type: ``alt`` is the same quant with another type, as it would be planned."""
    if alt is None:
        return f"KV cache {best.kv}: the only type that fits"
    if best.kv_quality > alt.kv_quality:
        return (f"KV cache {best.kv}: exact; {alt.kv} would give {alt.ctx} tokens at {alt.tg:.0f} tok/s, no "
                f"higher context tier within the speed window")
    cpu = (f" with experts of {alt.experts_on_cpu} layers in RAM" if alt.experts_on_cpu > best.experts_on_cpu
           else "")
    where = "outside it" if choice.window_tg and not choice.in_window(alt) else "less context"
    return (f"KV cache {best.kv}: it reaches {best.ctx} tokens within the speed window; {alt.kv} would reach "
            f"{alt.ctx} at {alt.tg:.0f} tok/s{cpu}, {where}")


# ------------------------------------------------------------------------------------ with the planner's search


def climb_tiers(base: Sequence[_O], floors: Floors, place: Callable[[_O, int], _O | None],
                tolerance: float) -> list[_O]:
    """The options placed for the context tiers above the floor (``place(option, tier)``: its quant and KV type
    with the fewest expert layers in RAM that reach ``tier``, or None), for the options that may win with them. A
    higher tier never predicts faster generation than the floor's placement (as many expert layers in RAM or
    more), so only those the window may hold climb: of the quality floor, within the window and the ubatch's
    ``tolerance`` of the fastest (or, when none meets the quality floor, those of the best quant)."""
    pool = [o for o in base if floors.quality_ok(o)]
    if pool:
        near = (1 - SPEED_WINDOW - tolerance) * max(o.tg for o in pool)
        climbers = [o for o in pool if o.tg >= near]
    else:
        top = max((o.quant_quality for o in base), default=0)
        climbers = [o for o in base if o.quant_quality == top]
    out: list[_O] = []
    for o in climbers:
        reached = o.ctx
        for tier in floors.tiers[1:]:
            if tier <= reached:  # the placement found for a lower tier already holds this context
                continue
            got = place(o, tier)
            if got is None:
                break
            out.append(got)
            reached = got.ctx
    return out


def rank_as_planned(options: Sequence[_O], floors: Floors, plan: Callable[[_O], tuple[_O, str | None]],
                    tolerance: float) -> tuple[Choice, dict[int, str | None]]:
    """:func:`rank` over the options as they would be launched: each one near the window first goes through
    ``plan`` (the planner's ubatch raise, which may cost up to ``tolerance`` of generation for faster prompts), so
    the window compares planned speeds. Returns the choice and, by id of the planned option, the ubatch reason of
    each that went through ``plan`` (None where nothing changed)."""
    first = rank(options, floors)
    if not first.window_tg:
        return first, {}
    near = (1 - SPEED_WINDOW - tolerance) * first.reference.tg
    planned: list[_O] = []
    reasons: dict[int, str | None] = {}
    for o in options:
        if o.tg >= near and floors.ctx_ok(o):
            o, why = plan(o)
            reasons[id(o)] = why
        planned.append(o)
    return rank(planned, floors), reasons


def alternatives(best: Option, choice: Choice, most: int) -> list[Option]:
    """The runners-up worth showing: the fastest plan meeting the floors, the plan's quant at a higher context
    tier (its fastest), the next better and the next lower quant (each its best-ranked option), then the rest of
    the ranking; one per quant and flag set, ``most`` at most. ``best`` is the plan as launched (its ubatch raised),
    ``choice.best`` as ranked."""
    chosen = choice.best
    f = choice.floors
    order = [o for o, _ in choice.ranked[1:]]
    same = [o for o in order if o.candidate is chosen.candidate]
    higher = sorted((o for o in same if f.tier(o) > f.tier(chosen)), key=lambda o: -o.tg)
    better = [o for o in order if o.quant_quality > chosen.quant_quality]
    worse = [o for o in order if o.quant_quality < chosen.quant_quality]
    step_up = [o for o in better if o.quant_quality == min(x.quant_quality for x in better)]
    step_down = [o for o in worse if o.quant_quality == max(x.quant_quality for x in worse)]
    out: list[Option] = []
    seen = {(id(best.candidate), best.flags), (id(chosen.candidate), chosen.flags)}
    for o in [choice.reference, *higher[:1], *step_up[:1], *step_down[:1], *order]:
        k = (id(o.candidate), o.flags)
        if k not in seen and len(out) < most:
            seen.add(k)
            out.append(o)
    return out

"""The balanced policy's rule on its own (tuner.policy): the quality floor, context tiers, the speed window, the
order within it, and what is given up (and said) when a floor cannot be met."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from tuner.models import QuantCandidate, resolve_candidates
from tuner.policy import CTX_FLOOR, Floors, ctx_tiers, meets_quality_floor, rank, tier_of, why_lost

TIERS = ctx_tiers(CTX_FLOOR, 262_144)


@pytest.fixture(scope="module")
def ladder() -> dict[str, QuantCandidate]:
    return {c.quant: c for c in resolve_candidates(None)}


@dataclass(frozen=True)
class Opt:
    """An option as the policy reads it."""

    candidate: QuantCandidate
    ctx: int
    tg: float
    kv: str = "f16"
    experts_on_cpu: int = 0

    @property
    def quant_quality(self) -> int:
        return self.candidate.quality_rank

    @property
    def kv_quality(self) -> int:
        return {"f16": 6, "q8_0": 4, "q4_0": 0}[self.kv]

    @property
    def bpw(self) -> float:
        return self.candidate.bits_per_weight


def test_the_quality_floor_is_the_q4_k_m_class(ladder: dict[str, QuantCandidate]) -> None:
    assert [q for q, c in ladder.items() if meets_quality_floor(c)] == [
        "BF16", "Q8_0", "UD-Q6_K_XL", "Q6_K", "Q5_K_M", "Q4_K_M", "UD-Q4_K_XL"]  # the uploader's mixes of the card
    iq4 = ladder["IQ4_XS"]
    assert meets_quality_floor(replace(iq4, quant="UD-Q4_K_XL"))  # an uploader's Q4_K mix counts by its name
    assert not meets_quality_floor(replace(ladder["Q4_K_M"], quant="Q4_K_S", layout=iq4.layout))


def test_context_tiers_double_from_the_floor_to_the_native_context() -> None:
    assert TIERS == (65536, 131072, 262144)
    assert ctx_tiers(65536, 65536) == (65536,) and ctx_tiers(40960, 40960) == (40960,)
    assert ctx_tiers(65536, 100_000) == (65536, 100_000)


def test_a_tier_above_the_floor_is_reached_within_a_tenth_and_the_floor_exactly() -> None:
    assert tier_of(243_712, TIERS) == 262_144 and tier_of(230_000, TIERS) == 131_072
    assert tier_of(65_536, TIERS) == 65_536 and tier_of(64_000, TIERS) == 32_768
    assert tier_of(5_000, TIERS) == 4_096


def test_within_the_window_more_context_beats_a_better_quant_and_speed(ladder: dict[str, QuantCandidate]) -> None:
    q4, q5 = ladder["Q4_K_M"], ladder["Q5_K_M"]
    fastest = Opt(q4, 70_000, 100.0)
    longer = Opt(q4, 140_000, 92.0)
    better = Opt(q5, 70_000, 95.0)
    native_too_slow = Opt(q4, 262_144, 85.0)
    choice = rank([fastest, longer, better, native_too_slow], Floors(CTX_FLOOR, TIERS))
    assert choice.best is longer and choice.reference is fastest and choice.window_tg == pytest.approx(90.0)
    assert [o for o, _ in choice.ranked][:3] == [longer, better, fastest]
    assert "more than 10% under the fastest plan" in why_lost(native_too_slow, longer, choice)
    assert why_lost(fastest, longer, choice).startswith("less context")
    assert not choice.warnings and choice.quality_met and choice.ctx_met


def test_an_exact_kv_cache_wins_at_equal_tier_and_quant(ladder: dict[str, QuantCandidate]) -> None:
    q4 = ladder["Q4_K_M"]
    exact, compact = Opt(q4, 140_000, 90.0), Opt(q4, 150_000, 97.0, kv="q8_0")
    choice = rank([exact, compact], Floors(CTX_FLOOR, TIERS))
    assert choice.best is exact
    assert why_lost(compact, exact, choice).startswith("quantized KV cache (q8_0)")


def test_below_the_quality_floor_only_if_nothing_else_reaches_the_context(ladder: dict[str, QuantCandidate]) -> None:
    q4, iq4, q2 = ladder["Q4_K_M"], ladder["IQ4_XS"], ladder["Q2_K"]
    floor_ok = Opt(q4, 70_000, 40.0)
    faster_lower = Opt(iq4, 262_144, 80.0)
    assert rank([floor_ok, faster_lower], Floors(CTX_FLOOR, TIERS)).best is floor_ok
    # nothing of the Q4_K_M class reaches 64K: the best quant that does, not the fastest, and a warning
    short_q4 = Opt(q4, 40_000, 50.0)
    choice = rank([short_q4, Opt(iq4, 70_000, 45.0), Opt(q2, 140_000, 70.0)], Floors(CTX_FLOOR, TIERS))
    assert choice.best.candidate is iq4 and not choice.quality_met and choice.ctx_met
    assert choice.warnings == ("no Q4_K_M-class quant fits with 65536 tokens of context: IQ4_XS (4.32 bits/weight) "
                               "is the best that does",)
    # an asked quant is no floor to warn about
    assert not rank([Opt(iq4, 70_000, 45.0)], Floors(CTX_FLOOR, TIERS, quality=False)).warnings


def test_when_nothing_reaches_the_context_floor_the_most_context_wins_with_a_warning(
        ladder: dict[str, QuantCandidate]) -> None:
    q4, q2 = ladder["Q4_K_M"], ladder["Q2_K"]
    choice = rank([Opt(q4, 9_000, 50.0), Opt(q2, 40_000, 20.0)], Floors(CTX_FLOOR, TIERS))
    assert choice.best.candidate is q2 and not choice.window_tg and not choice.ctx_met
    assert choice.warnings[0].startswith("nothing reaches 65536 tokens of context per slot here")


def test_without_a_gpu_a_quantized_cache_counts_only_up_to_the_floor(ladder: dict[str, QuantCandidate]) -> None:
    q4 = ladder["Q4_K_M"]
    exact, compact = Opt(q4, 70_000, 10.0), Opt(q4, 262_144, 10.0, kv="q8_0")
    assert rank([exact, compact], Floors(CTX_FLOOR, TIERS)).best is compact  # on a GPU: the higher tier
    assert rank([exact, compact], Floors(CTX_FLOOR, TIERS, cpu_only=True)).best is exact

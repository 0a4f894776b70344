"""Bench prompts: token pools cut from pseudo-English text, tokenized once by a live server.

A *prefix* pool fills a slot's context to a depth, and a *fresh* pool gives every measurement a slice no server has
seen before. All sets serve the same GGUF, so the ids are the same everywhere; the same measurement key gets the
same fresh slice on every set (fair), and no key is ever reused (a repeated prompt would be served from a context
checkpoint or the prompt cache, re-evaluating ~4 tokens).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

from tuner.errors import TunerError

_WORD_TEXT = (
    "the of and to in is that for it as with was on be by at this are from or an which have not but had they "
    "you were their one all we can her has there been if more when will would who so no out up into do time about "
    "than other them may these some only could its new two my first like over also any after what very most years "
    "people where made way many just should because each those now even how back much before well through make "
    "our such work life system data model memory river garden market number city water light music history "
    "window paper engine signal value table field power road energy family story method group island "
    "letter morning question answer reason result student teacher problem program language service country "
    "machine network season animal mountain simple quick quiet bright early late strong small large green "
    "careful modern ancient open closed warm cold happy serious compute measure write read build travel follow"
)
_WORDS = tuple(_WORD_TEXT.split(" "))


def pseudo_text(n_words: int, seed: int) -> str:
    """Deterministic English-like text: sentences of common words (realistic token mix and expert routing)."""
    rng = random.Random(seed)
    out: list[str] = []
    while len(out) < n_words:
        sentence = [rng.choice(_WORDS) for _ in range(rng.randint(6, 16))]
        sentence[0] = sentence[0].capitalize()
        out.extend(sentence)
        out[-1] += "." if rng.random() < 0.85 else ","
        if rng.random() < 0.08:
            out[-1] += "\n\n"
    return " ".join(out[:n_words])


class PromptSource:
    """Token pools for prefixes (context fill) and fresh prompt slices, tokenized by a server on first use.

    ``fresh(key, n)`` gives the same slice for the same key (so every set gets the same prompt for the same
    measurement) and a new, never used slice for a new key.
    """

    def __init__(self, tokenize: Callable[[str], list[int]] | None = None, seed: int = 1234) -> None:
        self._tokenize = tokenize
        self._seed = seed
        self._prefix: list[int] = []
        self._fresh: list[int] = []
        self._fresh_next = 0
        self._fresh_slices: dict[tuple[Any, ...], tuple[int, int]] = {}
        self._chunks = {"prefix": 0, "fresh": 0}

    def bind(self, tokenize: Callable[[str], list[int]]) -> None:
        """Tokenize with this (live) server from now on: every set serves the same GGUF, so the ids agree, and
        the server that tokenized first may have been stopped since (cycle mode, tuning rounds)."""
        self._tokenize = tokenize

    def _grow(self, pool: list[int], kind: str, need: int) -> None:
        if self._tokenize is None:
            raise TunerError("internal: prompt source used before a server could tokenize")
        words = 2048
        while len(pool) < need:
            seed = self._seed * 7919 + (1 if kind == "fresh" else 0) * 104729 + self._chunks[kind]
            self._chunks[kind] += 1
            tokens = self._tokenize(pseudo_text(words, seed) + "\n")
            if not tokens:
                raise TunerError("llama-server's /tokenize returned no tokens")
            pool.extend(tokens)
            words = min(words * 2, 65536)

    def prefix(self, depth: int) -> list[int]:
        self._grow(self._prefix, "prefix", depth)
        return self._prefix[:depth]

    def fresh(self, key: tuple[Any, ...], n_tokens: int) -> list[int]:
        if key not in self._fresh_slices:
            self._fresh_slices[key] = (self._fresh_next, n_tokens)
            self._fresh_next += n_tokens
        start, n = self._fresh_slices[key]
        if n != n_tokens:
            raise TunerError(f"internal: prompt key {key} reused with another length")
        self._grow(self._fresh, "fresh", start + n)
        return self._fresh[start:start + n]

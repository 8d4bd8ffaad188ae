"""The document being written: its seeded stream, paragraphs and template slots.

Every genre writer in ``genres.py`` works on a ``_Writer``; ``_Slots`` fills ``{slot}``
templates with fixed values or fresh draws from the world's word frequencies.
"""

from __future__ import annotations

import random
from collections.abc import Callable

from .lexicon import article, number_words, plural
from .world import World


class _Slots(dict):
    """format_map() mapping: fixed values from the dict, a fresh random draw for anything else."""

    def __init__(self, draw: dict[str, Callable[[], str]], **fixed: str):
        super().__init__(fixed)
        self.draw = draw

    def __missing__(self, key: str) -> str:
        return self.draw[key]()


class _Writer:
    """One document being written: its seeded stream, paragraphs and running word count."""

    def __init__(self, world: World, rng: random.Random):
        self.w = world
        self.rng = rng
        self.paragraphs: list[str] = []
        self.words = 0
        w, r = world, rng
        self.draw: dict[str, Callable[[], str]] = {
            "n": lambda: w.noun(r),
            "n2": lambda: w.noun(r),
            "ns": lambda: plural(w.noun(r)),
            "adj": lambda: w.adj(r),
            "adj2": lambda: w.adj(r),
            "a_adj": lambda: article(w.adj(r)),
            "adv": lambda: w.adv(r),
            "vt": lambda: w.vt(r)[1],
            "vt_base": lambda: w.vt(r)[0],
            "vt_pp": lambda: w.vt(r)[2],
            "vi": lambda: w.vi(r)[1],
            "vi2": lambda: w.vi(r)[1],
            "vi_base": lambda: w.vi(r)[0],
            "vi_pp": lambda: w.vi(r)[2],
            "prep": lambda: w.prep(r),
            "time": lambda: w.time(r),
            "time_ago": lambda: w.time_ago(r),
            "weather": lambda: w.weather(r),
            "num": lambda: number_words(r.randint(2, 12)),
        }

    def add(self, paragraph: str) -> None:
        self.paragraphs.append(paragraph)
        self.words += len(paragraph.split())

    def text(self) -> str:
        return "\n\n".join(self.paragraphs)

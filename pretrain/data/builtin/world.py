"""The seeded world of the built-in corpus: its places, people and word frequencies.

A seed fixes rivers, towns (with their histories), people and trades, and the rank order
of every word list; every document drawn from the same ``World`` agrees on its facts.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .lexicon import (
    _ADJECTIVES,
    _ADVERBS,
    _COOK_VERBS,
    _DISHES,
    _FIRST_NAMES_F,
    _FIRST_NAMES_M,
    _HILLS,
    _INTRANSITIVE,
    _NOUNS,
    _PREPOSITIONS,
    _REGIONS,
    _RIVER_HEADS,
    _RIVER_TAILS,
    _SEAS,
    _SURNAME_HEADS,
    _SURNAME_TAILS,
    _SURNAMES_EXTRA,
    _TIMES,
    _TIMES_AGO,
    _TOWN_EVENTS,
    _TOWN_HEADS,
    _TOWN_TAILS,
    _TRADES,
    _TRANSITIVE,
    _WEATHER,
)


class Zipf:
    """Draws items with probability proportional to 1 / rank**s (the order given is the rank)."""

    __slots__ = ("cum", "items", "total")

    def __init__(self, items: Sequence, s: float = 1.0):
        self.items = list(items)
        self.cum = list(itertools.accumulate(1.0 / (r + 1) ** s for r in range(len(self.items))))
        self.total = self.cum[-1]

    def __call__(self, rng: random.Random):
        return self.items[bisect.bisect(self.cum, rng.random() * self.total)]


@dataclass
class Person:
    name: str
    first: str
    pron: str  # she / he
    born: int
    trade: tuple[str, str, str, str, str]
    town: Town

    @property
    def poss(self) -> str:
        return "her" if self.pron == "she" else "his"


@dataclass
class River:
    name: str
    length_km: int
    hills: str
    mouth: str
    towns: list[Town] = field(default_factory=list)


@dataclass
class Town:
    name: str
    region: str
    river: River
    founded: int
    population: int
    known_for: tuple[str, str, str, str, str]
    xy: tuple[float, float]
    events: list[tuple[int, str]] = field(default_factory=list)
    people: list[Person] = field(default_factory=list)


def _compound(rng: random.Random, heads: Sequence[str], tails: Sequence[str]) -> str:
    """A name from two parts ("Dun" + "mere"), never "Wickwick", "Ashhaven" or "Craneer"."""
    while True:
        head, tail = rng.choice(heads), rng.choice(tails)
        if head.lower() != tail and not (tail and head[-1] == tail[0]):
            return head + tail


def _unique_names(make: Callable[[], str], n: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < n:
        name = make()
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


class World:
    """Everything a seed fixes: the fictional places and people, and word frequencies."""

    def __init__(self, seed: int):
        rng = random.Random(f"kiln-builtin-world:{seed}")
        taken: set[str] = set()

        def shuffled(items: Sequence) -> list:
            items = list(items)
            rng.shuffle(items)
            return items

        # Word frequencies: the rank order (hence which words are common) depends on the seed.
        self.noun = Zipf(shuffled(_NOUNS), s=0.9)
        self.adj = Zipf(shuffled(_ADJECTIVES), s=0.9)
        self.adv = Zipf(shuffled(_ADVERBS), s=0.9)
        self.vt = Zipf(shuffled(_TRANSITIVE), s=0.9)
        self.vi = Zipf(shuffled(_INTRANSITIVE), s=0.9)
        self.prep = Zipf(shuffled(_PREPOSITIONS))
        self.time = Zipf(shuffled(_TIMES))
        self.time_ago = Zipf(shuffled(_TIMES_AGO))
        self.weather = Zipf(shuffled(_WEATHER))
        self.dish = Zipf(shuffled(_DISHES))
        self.cook = Zipf(shuffled(_COOK_VERBS))
        self.trades = shuffled(_TRADES)
        self.trade = Zipf(self.trades, s=0.7)

        regions = rng.sample(_REGIONS, 6)
        hills = [f"the {h} Hills" for h in rng.sample(_HILLS, 6)]

        river_names = _unique_names(lambda: _compound(rng, _RIVER_HEADS, _RIVER_TAILS), 16, taken)
        self.rivers = [
            River(
                name=name,
                length_km=int(math.exp(rng.uniform(math.log(20), math.log(420)))),
                hills=rng.choice(hills),
                mouth=rng.choice(_SEAS),
            )
            for name in river_names
        ]
        town_names = _unique_names(lambda: _compound(rng, _TOWN_HEADS, _TOWN_TAILS), 60, taken)
        river_of = Zipf(self.rivers, s=0.6)
        self.towns: list[Town] = []
        for name in town_names:
            river = river_of(rng)
            town = Town(
                name=name,
                region=rng.choice(regions),
                river=river,
                founded=rng.randint(780, 1790),
                population=int(round(math.exp(rng.uniform(math.log(300), math.log(90000))), -1)),
                known_for=rng.choice(self.trades),
                xy=(rng.uniform(0, 300), rng.uniform(0, 300)),
            )
            river.towns.append(town)
            self.towns.append(town)
        for river in self.rivers:
            if not river.towns:  # every river runs through at least one town
                town = rng.choice(self.towns)
                town.river.towns.remove(town)
                town.river = river
                river.towns.append(town)
        for town in self.towns:
            years = sorted(rng.sample(range(town.founded + 20, 1900), 3))
            for year, template in zip(years, rng.sample(_TOWN_EVENTS, 3), strict=True):
                event = template.format(
                    n=rng.choice(["chapel", "granary", "mill", "tower", "inn"]),
                    river=town.river.name,
                    adj=rng.choice(["terrible", "long", "bitter", "sudden"]),
                    trade=rng.choice(self.trades)[0],
                )
                town.events.append((year, event))
        self.rivers = [r for r in self.rivers if r.towns]
        self.town = Zipf(self.towns, s=0.8)

        def person_name() -> str:
            if rng.random() < 0.08:
                surname = rng.choice(_SURNAMES_EXTRA)
            else:
                surname = _compound(rng, _SURNAME_HEADS, _SURNAME_TAILS)
            first = rng.choice(_FIRST_NAMES_F if rng.random() < 0.5 else _FIRST_NAMES_M)
            return f"{first} {surname}"

        self.people: list[Person] = []
        for name in _unique_names(person_name, 400, taken):
            first = name.split(" ")[0]
            town = self.town(rng)
            person = Person(
                name=name,
                first=first,
                pron="she" if first in _FIRST_NAMES_F else "he",
                born=rng.randint(1820, 1890),
                trade=self.trade(rng),
                town=town,
            )
            town.people.append(person)
            self.people.append(person)
        self.person = Zipf(self.people, s=0.75)

    @staticmethod
    def distance(a: Town, b: Town) -> int:
        """Kilometres between two towns (symmetric, at least 1)."""
        return max(1, round(math.hypot(a.xy[0] - b.xy[0], a.xy[1] - b.xy[1])))

"""The document writers of the built-in corpus, one per genre, and the genre table.

Each writer adds paragraphs to a ``_Writer`` (the document being written) until it reaches
its target word count, drawing only from the document's own seeded stream.
"""

from __future__ import annotations

import random

from .lexicon import (
    _DASH_SENTENCES,
    _RECIPE_INGREDIENTS,
    _SAYINGS,
    _SPEECH_VERBS,
    _STORY_SENTENCES,
    _UNITS,
    article,
    cap,
    number_words,
    plural,
)
from .world import Person, River, Town
from .writer import _Slots, _Writer


def _story(d: _Writer, target: int) -> None:
    w, rng = d.w, d.rng
    hero = w.person(rng)
    others = [p for p in (w.person(rng), w.person(rng)) if p is not hero] or [w.people[0]]
    town, trade = hero.town, hero.trade[0]
    cast = [hero.name, hero.first, hero.first, hero.pron, f"the {trade}"] + [
        p.first for p in others
    ]
    draw = dict(d.draw)
    draw.update(
        S=lambda: rng.choice(cast),
        S2=lambda: rng.choice(others).first,
        P=lambda: hero.pron,
        hero=lambda: rng.choice((hero.first, hero.first, hero.name, f"the {trade}")),
        vt2=lambda: w.vt(rng)[1],
        time_word=lambda: rng.choice(["morning", "evening", "night", "afternoon", "day"]),
        weather_verb=lambda: rng.choice(["fell", "lifted", "thickened", "passed", "returned"]),
    )
    slots = _Slots(draw, town=town.name)

    if rng.random() < 0.5:
        d.add(f"The {cap(w.adj(rng))} {cap(w.noun(rng))}")
    opening = rng.randrange(4)
    if opening == 0:
        first = f"Once, in {town.name}, there lived {article(trade)} named {hero.name}."
    elif opening == 1:
        first = (
            f"{hero.name} was {article(trade)} from {town.name}, and {hero.pron} had lived by "
            f"the {town.river.name} all {hero.poss} life."
        )
    elif opening == 2:
        year = hero.born + rng.randint(16, 60)
        first = (
            f"In the year {year}, {hero.name}, the {trade} of {town.name}, found "
            f"{article(w.adj(rng))} {w.noun(rng)} by the {town.river.name}."
        )
    else:
        first = (
            f"Nobody in {town.name} remembers the {w.noun(rng)} quite the way {hero.first} does."
        )
    sentences = [first]
    while d.words < target:
        for _ in range(rng.randint(3, 7)):
            roll = rng.random()
            if roll < 0.08:
                saying = cap(rng.choice(_SAYINGS).format_map(slots))
                q = "?" if saying.startswith(("Where", "Have")) else ","
                quote = ("“", "”") if rng.random() < 0.3 else ('"', '"')
                speaker = rng.choice([hero.first, *(p.first for p in others)])
                sentences.append(
                    f"{quote[0]}{saying}{q}{quote[1]} {rng.choice(_SPEECH_VERBS)} {speaker}."
                )
            elif roll < 0.11:
                sentences.append(cap(rng.choice(_DASH_SENTENCES).format_map(slots)))
            elif roll < 0.13:
                sentences.append(
                    f"The river that runs through {town.name} is the {town.river.name}, and "
                    f"{hero.first} {w.vi(rng)[1]} along its banks {w.adv(rng)}."
                )
            elif roll < 0.15:
                other = rng.choice(others)
                sentences.append(
                    f"{other.first} was {article(other.trade[0])} from {other.town.name}, "
                    f"{w.distance(town, other.town)} kilometres away."
                    if other.town is not town
                    else f"{other.first} was {article(other.trade[0])} from {town.name} too."
                )
            else:
                sentences.append(cap(rng.choice(_STORY_SENTENCES).format_map(slots)))
        d.add(" ".join(sentences))
        sentences = []
        if rng.random() < 0.04:  # a song, indented
            lines = [
                "    " + cap(f"{w.adj(rng)} {w.noun(rng)}, {w.adj(rng)} {w.noun(rng)},"),
                "    " + cap(f"{w.vi(rng)[1]} {w.prep(rng)} the {w.noun(rng)} at {w.time(rng)};"),
                "    " + cap(f"{w.adv(rng)} the {w.noun(rng)} {w.vi(rng)[1]}."),
            ]
            d.add(f"{hero.first} sang:\n" + "\n".join(lines))
    endings = [
        f"And that is how {hero.first} came to {w.vt(rng)[0]} the {w.noun(rng)}.",
        f"In {town.name}, they still talk about it.",
        f"The next morning, {hero.first} went back to {hero.poss} {hero.trade[4]}.",
        "Nobody ever found out what happened to it.",
    ]
    d.paragraphs[-1] += " " + rng.choice(endings)


def _town_paragraphs(d: _Writer, town: Town) -> list[str]:
    w, rng = d.w, d.rng
    trade = town.known_for
    lead = [
        f"{town.name} is a town in {town.region}.",
        f"The river that runs through {town.name} is the {town.river.name}.",
        f"{town.name} was founded in {town.founded} and has a population of about "
        f"{town.population:,}.",
        f"It is known for its {trade[2]}, and many of its people work as {trade[0]}s.",
    ]
    history = [f"In {year}, {event}." for year, event in town.events]
    if rng.random() < 0.5:
        history.insert(0, f"The history of {town.name} is closely tied to the {town.river.name}.")
    geo = []
    for other in rng.sample(w.towns, 3):
        if other is not town:
            geo.append(f"{town.name} lies {w.distance(town, other)} kilometres from {other.name}.")
    geo.append(
        f"The {w.adj(rng)} {plural(w.noun(rng))} of {town.name} are well known in {town.region}."
    )
    paragraphs = [" ".join(lead), " ".join(history), " ".join(geo)]
    if town.people:
        notable = rng.sample(town.people, min(3, len(town.people)))
        names = [f"{p.name}, {article(p.trade[0])}" for p in notable]
        listing = names[0] if len(names) == 1 else "; ".join(names[:-1]) + "; and " + names[-1]
        paragraphs.append(f"Notable people from {town.name} include {listing}.")
    return paragraphs


def _person_paragraphs(d: _Writer, p: Person) -> list[str]:
    w, rng = d.w, d.rng
    product = p.trade[2]
    lead = (
        f"{p.name} (born {p.born}) is {article(p.trade[0])} from {p.town.name}. "
        f"{cap(p.pron)} works in a {p.trade[4]} near the {p.town.river.name} and is known for "
        f"{p.poss} {w.adj(rng)} {product}."
    )
    more = (
        f"Like most {p.trade[0]}s, {p.first} keeps {p.poss} {p.trade[3]} {w.adj(rng)} and "
        f"{w.adv(rng)} {w.vt(rng)[2]}. {cap(p.pron)} has lived in {p.town.name}, in "
        f"{p.town.region}, for most of {p.poss} life."
    )
    return [lead, more]


def _river_paragraphs(d: _Writer, river: River) -> list[str]:
    names = [t.name for t in river.towns]
    through = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    lead = (
        f"The {river.name} is a river about {river.length_km} kilometres long. It rises in "
        f"{river.hills}, flows through {through} and reaches {river.mouth}."
    )
    facts = " ".join(
        f"The river that runs through {t.name} is the {river.name}." for t in river.towns
    )
    return [lead, facts]


def _trade_paragraphs(d: _Writer, trade: tuple[str, str, str, str, str]) -> list[str]:
    w, rng = d.w, d.rng
    name, _, products, tool, place = trade
    towns = [t.name for t in w.towns if t.known_for is trade][:4]
    lead = (
        f"{cap(article(name))} makes {products}. The most important tool of {article(name)} is "
        f"the {tool}, and the work is done in {article(place)}."
    )
    if towns:
        lead += f" {', '.join(towns)} {'is' if len(towns) == 1 else 'are'} known for {products}."
    extra = (
        f"A good {name} works {w.adv(rng)} and keeps the {tool} {w.adj(rng)}. Apprentices often "
        f"begin by sweeping the {place} and carrying {plural(w.noun(rng))}."
    )
    return [lead, extra]


def _encyclopedia(d: _Writer, target: int) -> None:
    w, rng = d.w, d.rng
    first = True
    while d.words < target:
        roll = rng.random()
        if roll < 0.5:
            subject: Town | Person | River | tuple = w.town(rng)
            title, paragraphs = subject.name, _town_paragraphs(d, subject)
        elif roll < 0.75:
            subject = w.person(rng)
            title, paragraphs = subject.name, _person_paragraphs(d, subject)
        elif roll < 0.9:
            subject = rng.choice(w.rivers)
            title, paragraphs = f"The {subject.name}", _river_paragraphs(d, subject)
        else:
            subject = w.trade(rng)
            title, paragraphs = cap(plural(subject[0])), _trade_paragraphs(d, subject)
        if first or rng.random() < 0.7:
            d.add(title)
        first = False
        for paragraph in paragraphs:
            if paragraph:
                d.add(paragraph)


def _arith_problem(d: _Writer) -> str:
    w, rng = d.w, d.rng
    kind = rng.randrange(8)
    if kind == 0:  # addition word problem
        p = w.person(rng)
        a, b = rng.randint(2, 99), rng.randint(2, 99)
        goods = p.trade[2]
        return (
            f"{p.name} the {p.trade[0]} made {a} {goods} on Monday and {b} on Tuesday. "
            f"How many {goods} did {p.pron} make in all?\n"
            f"{a} + {b} = {a + b}, so {p.pron} made {a + b} {goods}."
        )
    if kind == 1:  # subtraction word problem
        p = w.person(rng)
        a = rng.randint(10, 300)
        b = rng.randint(2, a - 2)
        goods = p.trade[2]
        return (
            f"{p.name} had {a} {goods} and sold {b} of them at the market in {p.town.name}. "
            f"How many are left?\n{a} - {b} = {a - b}. There are {a - b} {goods} left."
        )
    if kind == 2:  # multiplication and division
        a, b = rng.randint(2, 12), rng.randint(2, 60)
        noun = plural(w.noun(rng))
        if rng.random() < 0.5:
            return (
                f"There are {a} crates with {b} {noun} in each. How many {noun} are there?\n"
                f"{a} × {b} = {a * b}. There are {a * b} {noun}."
            )
        return (
            f"{a * b} {noun} are shared equally among {a} friends. How many does each get?\n"
            f"{a * b} ÷ {a} = {b}. Each friend gets {b}."
        )
    if kind == 3:  # distances in the world
        t1, t2, t3 = rng.sample(w.towns, 3)
        d1, d2 = w.distance(t1, t2), w.distance(t2, t3)
        return (
            f"From {t1.name} to {t2.name} is {d1} kilometres, and from {t2.name} to {t3.name} "
            f"is {d2} kilometres. How far is the whole journey?\n"
            f"{d1} + {d2} = {d1 + d2}. The journey is {d1 + d2} kilometres."
        )
    if kind == 4:  # ages from birth years
        p = w.person(rng)
        year = p.born + rng.randint(10, 70)
        age = year - p.born
        return (
            f"{p.name} was born in {p.born}. How old was {p.pron} in {year}?\n"
            f"{year} - {p.born} = {age}. {cap(p.pron)} was {age} years old."
        )
    if kind == 5:  # two steps
        a, b, c = rng.randint(2, 12), rng.randint(2, 40), rng.randint(1, 99)
        return (
            f"Work out {a} × {b} + {c}.\nFirst, {a} × {b} = {a * b}. "
            f"Then, {a * b} + {c} = {a * b + c}. So the answer is {a * b + c}."
        )
    if kind == 6:  # in words
        a, b = rng.randint(1, 99), rng.randint(1, 99)
        return f"In words: {number_words(a)} plus {number_words(b)} is {number_words(a + b)}."
    # column addition, indented
    a, b = rng.randint(100, 9999), rng.randint(100, 9999)
    width = len(str(a + b)) + 2
    indent = "\t" if rng.random() < 0.5 else "    "
    return (
        f"Add {a} and {b} in columns:\n"
        f"{indent}{a:>{width}}\n{indent}+{b:>{width - 1}}\n{indent}{'-' * width}\n"
        f"{indent}{a + b:>{width}}"
    )


def _arithmetic(d: _Writer, target: int) -> None:
    rng = d.rng
    d.add(rng.choice(["Worked examples", "Arithmetic practice", "Sums for the schoolroom"]))
    if rng.random() < 0.5:
        d.add(f"Lesson {rng.randint(1, 40)}. Read each problem, then check the working.")
    number = 1
    while d.words < target:
        if rng.random() < 0.2:  # a quick drill
            lines = []
            for i in range(rng.randint(3, 6)):
                a, b = rng.randint(1, 50), rng.randint(1, 50)
                op = rng.choice("+-×")
                if op == "-":
                    a, b = max(a, b), min(a, b)
                result = a + b if op == "+" else a - b if op == "-" else a * b
                lines.append(f"{chr(ord('a') + i)}) {a} {op} {b} = {result}")
            d.add("Drill:\n" + "\n".join(lines))
        else:
            d.add(f"Problem {number}. " + _arith_problem(d))
            number += 1


def _amount(rng: random.Random) -> str:
    n, unit = rng.randint(1, 6), rng.choice(_UNITS)
    return f"{n} {unit if n == 1 else plural(unit)}"


def _recipe(d: _Writer) -> None:
    w, rng = d.w, d.rng
    town = w.town(rng)
    dish = w.dish(rng)
    d.add(f"{cap(w.adj(rng))} {dish} as they make it in {town.name}")
    d.add(f"Serves {rng.randint(2, 8)}. Takes about {rng.choice([20, 30, 45, 60, 90])} minutes.")
    items = rng.sample(_RECIPE_INGREDIENTS, rng.randint(3, 8))
    d.add(
        "Ingredients:\n" + "\n".join(f"{i}. {_amount(rng)} of {x}" for i, x in enumerate(items, 1))
    )
    steps = []
    for i in range(1, rng.randint(3, 7) + 1):
        x = rng.choice(items)
        step = f"{cap(w.cook(rng))} the {x} {w.adv(rng)}"
        if rng.random() < 0.5:
            step += f" for {rng.randint(2, 40)} minutes"
        steps.append(f"{i}. {step}.")
    d.add("Method:\n" + "\n".join(steps))
    if rng.random() < 0.4:
        d.add(f"Tip: the {plural(w.noun(rng))} of {town.name} say it is best served {w.adj(rng)}.")


def _guide(d: _Writer) -> None:
    w, rng = d.w, d.rng
    town = w.town(rng)
    d.add(f"{rng.randint(3, 9)} things to see in {town.name}")
    lines = [
        f"The banks of the {town.river.name}, which runs through the town.",
        f"The {w.adj(rng)} {w.noun(rng)} by the market square.",
        f"The old {town.known_for[4]}, for which {town.name} is famous.",
    ]
    if town.people:
        p = rng.choice(town.people)
        lines.append(f"The {p.trade[4]} of {p.name}, the {p.trade[0]}.")
    for _ in range(rng.randint(1, 4)):
        lines.append(f"The {w.adj(rng)} {w.noun(rng)} {w.prep(rng)} the {w.noun(rng)}.")
    rng.shuffle(lines)
    d.add("\n".join(f"{i}. {line}" for i, line in enumerate(lines, 1)))


def _tools(d: _Writer) -> None:
    w, rng = d.w, d.rng
    trade = w.trade(rng)
    d.add(f"What every {trade[0]} needs")
    lines = [f"1. A good {trade[3]}.\n\t– keep it {w.adj(rng)} and {w.adv(rng)} {w.vt(rng)[2]}"]
    for i in range(2, rng.randint(3, 7)):
        lines.append(f"{i}. {cap(article(w.adj(rng)))} {w.noun(rng)}.")
        if rng.random() < 0.4:
            lines.append(f"\t– for the {w.adj(rng)} {plural(w.noun(rng))}")
    d.add("\n".join(lines))


def _checklist(d: _Writer) -> None:
    w, rng = d.w, d.rng
    town = w.town(rng)
    d.add(f"Before the journey to {town.name}:")
    lines = [f"- {article(w.adj(rng))} {w.noun(rng)}" for _ in range(rng.randint(3, 8))]
    lines.append(f"- a map showing the {town.river.name}")
    d.add("\n".join(lines))


def _list(d: _Writer, target: int) -> None:
    makers = [_recipe, _guide, _tools, _checklist]
    while d.words < target:
        d.rng.choice(makers)(d)


def _dialogue(d: _Writer, target: int) -> None:
    w, rng = d.w, d.rng
    a = w.person(rng)
    b = w.person(rng)
    while b is a:
        b = rng.choice(w.people)
    style = rng.randrange(3)  # 0: "straight", 1: “curly”, 2: script
    d.add(
        f"{a.name} met {b.name} at the {rng.choice(['market', 'inn', 'ferry', 'fair'])} in "
        f"{a.town.name} one {rng.choice(['morning', 'evening', 'afternoon'])}."
    )
    slots = _Slots(d.draw)

    def line(p: Person, other: Person) -> str:
        roll = rng.random()
        if roll < 0.15:
            return (
                f"I work as {article(p.trade[0])}, you know. "
                f"I made {rng.randint(2, 30)} {p.trade[2]} this week."
            )
        if roll < 0.27:
            return f"I grew up in {p.town.name}, by the {p.town.river.name}."
        if roll < 0.35:
            dist = w.distance(p.town, other.town)
            if p.town is other.town:
                return f"We are both from {p.town.name}, aren't we?"
            return f"{other.town.name} is {dist} kilometres from {p.town.name}, isn't it?"
        if roll < 0.42:
            return f"Did you go to {w.town(rng).name} {w.time_ago(rng)}?"
        if roll < 0.5:
            return rng.choice(
                ["Yes.", "No, not yet.", "Perhaps.", "I don't think so.", "Of course!"]
            )
        saying = cap(rng.choice(_SAYINGS).format_map(slots))
        return saying + ("?" if saying.startswith(("Where", "Have")) else ".")

    speakers = (a, b)
    turn = 0
    while d.words < target:
        p, other = speakers[turn % 2], speakers[(turn + 1) % 2]
        said = line(p, other)
        if style == 2:
            d.add(f"{p.first.upper()}: {said}")
        else:
            q = ("“", "”") if style == 1 else ('"', '"')
            verb = "asked" if said.endswith("?") else rng.choice(["said", "replied", "said"])
            if said.endswith("."):
                said = said[:-1] + ","
            d.add(f"{q[0]}{said}{q[1]} {verb} {p.first}.")
        turn += 1
        if rng.random() < 0.1:
            d.add(cap(f"{p.first} {w.vi(rng)[1]} {w.adv(rng)} {w.prep(rng)} the {w.noun(rng)}."))


_GENRE_WRITERS = {
    "story": _story,
    "encyclopedia": _encyclopedia,
    "arithmetic": _arithmetic,
    "list": _list,
    "dialogue": _dialogue,
}

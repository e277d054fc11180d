"""English-like filler sentences from small word lists: the `essay` haystack and the words of generated keys.

Everything draws from a `random.Random` passed in; the text is pure ASCII (one byte per character) and holds
no digits, so numbers in a prompt are always facts.
"""

from __future__ import annotations

import random
import string

ADJECTIVES = (
    "old young quiet bright dark small large warm cold green silver golden gentle busy empty distant "
    "narrow wide heavy soft ancient simple strange calm happy tired careful wooden early hidden open "
    "clear proud lonely famous"
).split()
NOUNS = (
    "river garden house village mountain forest road bridge window door table letter book lamp market "
    "city field boat train station tower castle school teacher farmer baker child dog cat horse bird "
    "tree flower stone cloud song story map kitchen library harbor island valley hill path wall roof "
    "candle basket coat hat ship wagon well fire cup chair shop painter sailor doctor king queen neighbor"
).split()
NAMES = "Anna Ben Clara David Elena Felix Grace Henry Iris Jonas Kate Leo Maria Noah Olivia".split()
TRANSITIVE = (
    "carried painted found watched opened closed cleaned visited crossed repaired followed noticed "
    "lifted built bought sold wrote read moved remembered borrowed filled described admired"
).split()
INTRANSITIVE = (
    "walked waited slept smiled laughed rested wandered listened arrived returned stayed sang worked "
    "danced paused turned climbed stood sat shouted"
).split()
ADVERBS = (
    "slowly quickly quietly carefully happily often rarely again gently suddenly softly later calmly "
    "proudly briefly patiently eagerly together alone once"
).split()
PREPOSITIONS = "near behind beside across along under over past through around toward inside".split()
TIMES = (
    "In the morning", "Later that day", "At night", "Before dinner", "After the storm", "Every summer",
    "On Sunday", "Long ago", "That evening", "At dawn", "Soon after", "In winter",
)
TEMPLATES = (
    "The {adj} {noun} {iverb} {prep} the {noun}.",
    "{name} {tverb} the {adj} {noun} {adv}.",
    "{time}, {name} {iverb} {prep} the {noun}.",
    "{name} and {name} {tverb} the {noun} {prep} the {noun}.",
    "Nobody knew why the {noun} was so {adj}.",
    "The {noun} was {adj}, and the {noun} was {adj}.",
    "{name} said that the {noun} {prep} the {noun} looked {adj}.",
    "When the {noun} {iverb}, {name} {iverb} {adv}.",
    "{time}, the {adj} {noun} {iverb} {adv}.",
    "It was {a_adj} day in the {noun}.",
    "{name} {tverb} {a_noun} and {iverb}.",
)
SHORT = (
    "No.", "Yes.", "Why?", "Look.", "Wait.", "Rain fell.", "All was calm.", "Time passed.", "Nobody spoke.",
    "Night fell.", "The sun rose.", "Birds sang.", "It was late.", "The wind blew.", "Then it was quiet.",
)
SLOTS = {
    "adj": ADJECTIVES, "noun": NOUNS, "name": NAMES, "tverb": TRANSITIVE, "iverb": INTRANSITIVE,
    "adv": ADVERBS, "prep": PREPOSITIONS, "time": TIMES,
}


def _with_article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _sentence(rng: random.Random) -> str:
    """One sentence from a random template, each slot filled independently."""
    parts = []
    for literal, name, _, _ in string.Formatter().parse(rng.choice(TEMPLATES)):
        parts.append(literal)
        if name is None:
            continue
        if name.startswith("a_"):
            parts.append(_with_article(rng.choice(SLOTS[name[2:]])))
        else:
            parts.append(rng.choice(SLOTS[name]))
    return "".join(parts)


def sentences(rng: random.Random, n_chars: int) -> list[str]:
    """Sentences whose space-joined length is at most `n_chars` and at least `n_chars - 3`."""
    out: list[str] = []
    used = -1  # length of " ".join(out); the first sentence needs no space
    misses = 0
    while misses < 4:  # a few more draws once one does not fit, then close the gap with short ones
        candidate = _sentence(rng)
        if used + 1 + len(candidate) > n_chars:
            misses += 1
            continue
        out.append(candidate)
        used += 1 + len(candidate)
    while True:
        short = SHORT + (
            f"{rng.choice(NAMES)} {rng.choice(INTRANSITIVE)}.",
            f"The {rng.choice(NOUNS)} was {rng.choice(ADJECTIVES)}.",
        )
        fitting = [s for s in short if used + 1 + len(s) <= n_chars]
        if not fitting:
            return out
        out.append(max(fitting, key=len))
        used += 1 + len(out[-1])


def filler(rng: random.Random, n_chars: int) -> str:
    """English-like filler text of whole sentences, between `n_chars - 3` and `n_chars` characters."""
    return " ".join(sentences(rng, n_chars))

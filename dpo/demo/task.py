"""A synthetic instruction task that a tiny transformer can learn exactly, with a programmatic judge.

Four categories of facts, each asked in five phrasings:

    addition   "What is 3 plus 4?"                 -> "7"        (single-digit operands)
    opposite   "What is the opposite of hot?"      -> "cold"     (fixed table, both directions)
    next       "What comes after Monday?"          -> "Tuesday"  (weekdays, months, numbers 1-40)
    capital    "What is the capital of Zorbia?"    -> "Kelmar"   (fixed table of fictional countries)

An instruction is one (fact, phrasing) pair. For every fact exactly one phrasing is held out, chosen by a
stable hash of the fact, so held-out instructions never occur in SFT or DPO training text while every
held-out fact is still learnable from its other phrasings.

Answers come in three kinds, which mirror the failure modes of an SFT model that DPO should fix:

    concise    "7."                                         correct, nothing more
    rambling   "7. Bananas are technically berries."        correct, followed by irrelevant sentences
    wrong      "8."  (optionally followed by rambling)      a fixed, plausible mistake for the fact

The judge scores an answer 1.0 if it is correct and concise, 0.5 if correct but not concise, 0.0 if
wrong; `compare` turns two scores into a preference (1.0, 0.5 or 0.0).

Everything here is plain Python data; randomness comes only from the `random.Random` passed in or
seeded from the `seed` argument, so every output is a pure function of its arguments.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from functools import lru_cache

CATEGORIES = ("addition", "opposite", "next", "capital")
SPLITS = ("train", "test")
N_PHRASINGS = 5

PHRASINGS: dict[str, tuple[str, ...]] = {
    "addition": (
        "What is {a} plus {b}?",
        "What is {a} + {b}?",
        "Add {a} and {b}.",
        "What is the sum of {a} and {b}?",
        "Compute {a} + {b}.",
    ),
    "opposite": (
        "What is the opposite of {x}?",
        "Give the opposite of {x}.",
        "What word means the opposite of {x}?",
        "Name the antonym of {x}.",
        "What is the antonym of {x}?",
    ),
    "next": (
        "What comes after {x}?",
        "Which comes right after {x}?",
        "Name the item that follows {x}.",
        "What follows {x}?",
        "What is next after {x}?",
    ),
    "capital": (
        "What is the capital of {x}?",
        "Name the capital of {x}.",
        "Which city is the capital of {x}?",
        "Tell me the capital of {x}.",
        "What city is the capital of {x}?",
    ),
}

OPPOSITE_PAIRS = (
    ("hot", "cold"), ("big", "small"), ("up", "down"), ("fast", "slow"), ("happy", "sad"),
    ("light", "dark"), ("open", "closed"), ("early", "late"), ("full", "empty"), ("hard", "soft"),
    ("high", "low"), ("long", "short"), ("wet", "dry"), ("loud", "quiet"), ("strong", "weak"),
    ("rich", "poor"), ("thick", "thin"), ("near", "far"), ("push", "pull"), ("win", "lose"),
    ("day", "night"), ("left", "right"), ("before", "after"), ("buy", "sell"), ("clean", "dirty"),
    ("asleep", "awake"), ("true", "false"), ("top", "bottom"), ("north", "south"), ("sweet", "sour"),
)

WEEKDAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
          "October", "November", "December")
NUMBER_RANGE = range(1, 41)  # "What comes after 17?" -> "18"

CAPITALS = (
    ("Zorbia", "Kelmar"), ("Valdoria", "Prennholt"), ("Quenland", "Tarsis"), ("Morvania", "Ulbek"),
    ("Esteria", "Davroth"), ("Lunaria", "Sorvik"), ("Brakmoor", "Fenwald"), ("Calidria", "Oskaro"),
    ("Drevania", "Mirtal"), ("Fennoria", "Gaskel"), ("Halvenia", "Rosmund"), ("Istrovia", "Belcarn"),
    ("Jorvland", "Nessik"), ("Kaldoria", "Varnis"), ("Lorvista", "Quenby"), ("Marrowind", "Talvik"),
    ("Norvatia", "Eldris"), ("Pellandia", "Hurst"), ("Ruskavia", "Zendor"), ("Selvania", "Ormatch"),
    ("Tarvonia", "Lisk"), ("Umbravia", "Corvel"), ("Veltria", "Amberly"), ("Wendaria", "Spirrow"),
)

# Irrelevant sentences appended after a correct answer: the verbosity DPO should remove.
RAMBLING_BANK = (
    "I hope this helps.",
    "Let me know if you have any other questions.",
    "Bananas are technically berries.",
    "The weather has been lovely this week.",
    "Many people enjoy a cup of tea in the afternoon.",
    "Learning something new every day keeps the mind sharp.",
    "I once read a long book about lighthouses.",
    "Some say the best ideas come during a quiet walk.",
    "Honey never spoils if it is stored well.",
    "Remember to drink enough water today.",
    "Mountains can create their own weather.",
    "Octopuses have three hearts.",
    "A good night of sleep makes everything easier.",
    "My favourite colour changes with the seasons.",
    "Cats spend most of the day sleeping.",
    "There are many ways to look at this.",
)

# The SFT mix (fractions of records): mostly rambling, some wrong, a minority concise and correct.
SFT_MIX = {"rambling": 0.80, "wrong": 0.16, "concise": 0.04}
WRONG_RAMBLE_PROB = 0.5  # a wrong SFT answer is followed by rambling this often
MAX_RAMBLING_SENTENCES = 2

REJECTED_RAMBLING_PROB = 0.5  # else the rejected answer is wrong
DEFAULT_PREFERENCE_SIZES = {"train": 2048, "test": 200}
SENTENCE_ENDS = ".!?\n"


@dataclass(frozen=True)
class Instruction:
    """One (fact, phrasing) pair: the instruction's text, its correct answer and its category."""

    text: str
    answer: str
    category: str


@dataclass(frozen=True)
class Verdict:
    """The judge's verdict on an answer: correct, concise, its score (1.0, 0.5 or 0.0) and the category."""

    correct: bool
    concise: bool
    score: float
    category: str


@dataclass(frozen=True)
class _Fact:
    category: str
    key: str  # identifies the fact within its category, e.g. "3+4", "hot", "Monday", "Zorbia"
    slots: tuple[tuple[str, str], ...]  # values for the phrasing's {placeholders}
    answer: str
    distractors: tuple[str, ...]  # the fixed wrong answers for this fact


def _stable_hash(text: str) -> int:
    """A hash that, unlike `hash`, is identical across processes and machines."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _addition_facts() -> list[_Fact]:
    facts = []
    for a in range(10):
        for b in range(10):
            s = a + b
            facts.append(_Fact("addition", f"{a}+{b}", (("a", str(a)), ("b", str(b))), str(s), (str(s + 1),)))
    return facts


def _opposite_facts() -> list[_Fact]:
    directed = list(OPPOSITE_PAIRS) + [(y, x) for x, y in OPPOSITE_PAIRS]
    return [_Fact("opposite", x, (("x", x),), y, (x,)) for x, y in directed]


def _next_facts() -> list[_Fact]:
    facts = []
    for cycle in (WEEKDAYS, MONTHS):
        n = len(cycle)
        for i, x in enumerate(cycle):
            facts.append(_Fact("next", x, (("x", x),), cycle[(i + 1) % n], (cycle[(i + 2) % n],)))
    for x in NUMBER_RANGE:
        facts.append(_Fact("next", str(x), (("x", str(x)),), str(x + 1), (str(x + 2),)))
    return facts


def _capital_facts() -> list[_Fact]:
    return [_Fact("capital", country, (("x", country),), city, (country,)) for country, city in CAPITALS]


@lru_cache(maxsize=1)
def _facts() -> tuple[_Fact, ...]:
    return tuple(_addition_facts() + _opposite_facts() + _next_facts() + _capital_facts())


def _held_out_phrasing(fact: _Fact) -> int:
    return _stable_hash(f"{fact.category}|{fact.key}") % N_PHRASINGS


@lru_cache(maxsize=1)
def _instruction_pools() -> dict[str, dict[str, tuple[tuple[Instruction, _Fact], ...]]]:
    """split -> category -> every (instruction, fact) of that split, in a fixed order."""
    pools: dict[str, dict[str, list[tuple[Instruction, _Fact]]]] = {
        split: {c: [] for c in CATEGORIES} for split in SPLITS}
    for fact in _facts():
        held_out = _held_out_phrasing(fact)
        for i, phrasing in enumerate(PHRASINGS[fact.category]):
            instr = Instruction(phrasing.format(**dict(fact.slots)), fact.answer, fact.category)
            pools["test" if i == held_out else "train"][fact.category].append((instr, fact))
    return {split: {c: tuple(v) for c, v in by_cat.items()} for split, by_cat in pools.items()}


@lru_cache(maxsize=1)
def _fact_of() -> dict[Instruction, _Fact]:
    return {instr: fact for by_cat in _instruction_pools().values() for pairs in by_cat.values()
            for instr, fact in pairs}


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def instructions(split: str) -> list[Instruction]:
    """Every instruction of a split ("train": 4 phrasings per fact, "test": the held-out one)."""
    _check_split(split)
    return [instr for pairs in _instruction_pools()[split].values() for instr, _ in pairs]


def sample_instruction(rng: random.Random, split: str = "train") -> Instruction:
    """A category uniformly at random, then an instruction of that category and split uniformly."""
    _check_split(split)
    category = rng.choice(CATEGORIES)
    instr, _ = rng.choice(_instruction_pools()[split][category])
    return instr


def held_out_instructions(n: int, seed: int = 0) -> list[Instruction]:
    """n distinct held-out instructions in a seeded random order (never seen in SFT or DPO training)."""
    pool = instructions("test")
    if not 0 <= n <= len(pool):
        raise ValueError(f"n must be in [0, {len(pool)}] (the number of held-out instructions), got {n}")
    return random.Random(seed).sample(pool, n)


def _lookup(instr: Instruction) -> _Fact:
    try:
        return _fact_of()[instr]
    except KeyError:
        raise ValueError(f"not an instruction of the demo task: {instr.text!r}") from None


def concise_answer(instr: Instruction) -> str:
    """The correct answer and nothing more, e.g. "7."."""
    return f"{instr.answer}."


def _rambling(rng: random.Random) -> str:
    k = rng.randint(1, MAX_RAMBLING_SENTENCES)
    return " ".join(rng.sample(RAMBLING_BANK, k))


def rambling_answer(instr: Instruction, rng: random.Random) -> str:
    """The correct answer followed by 1..MAX_RAMBLING_SENTENCES irrelevant sentences."""
    return f"{concise_answer(instr)} {_rambling(rng)}"


def wrong_answer(instr: Instruction, rng: random.Random) -> str:
    """One of the fact's fixed plausible mistakes, in the concise form ("8.")."""
    return f"{rng.choice(_lookup(instr).distractors)}."


def _sft_response(instr: Instruction, rng: random.Random) -> str:
    u = rng.random()
    if u < SFT_MIX["concise"]:
        return concise_answer(instr)
    if u < SFT_MIX["concise"] + SFT_MIX["rambling"]:
        return rambling_answer(instr, rng)
    wrong = wrong_answer(instr, rng)
    return f"{wrong} {_rambling(rng)}" if rng.random() < WRONG_RAMBLE_PROB else wrong


def sft_records(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n SFT examples {"prompt": instruction text, "response": answer} on training instructions only.

    The mix is deliberately imperfect (SFT_MIX): most responses ramble after a correct answer, some
    are wrong, a minority are correct and concise.
    """
    rng = random.Random(_stable_hash(f"sft|{seed}"))
    records = []
    for _ in range(n):
        instr = sample_instruction(rng, "train")
        records.append({"prompt": instr.text, "response": _sft_response(instr, rng)})
    return records


def preference_records(split: str, n: int | None = None, seed: int = 0) -> list[dict[str, str]]:
    """Preference pairs {"prompt", "chosen", "rejected", "category"} on instructions of `split`.

    prompt is the bare instruction; chosen is the concise correct answer; rejected is, with equal
    probability, the correct answer followed by rambling or a bare wrong answer. Default sizes:
    DEFAULT_PREFERENCE_SIZES.
    """
    _check_split(split)
    n = DEFAULT_PREFERENCE_SIZES[split] if n is None else n
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = random.Random(_stable_hash(f"preferences|{split}|{seed}"))
    records = []
    for _ in range(n):
        instr = sample_instruction(rng, split)
        if rng.random() < REJECTED_RAMBLING_PROB:
            rejected = rambling_answer(instr, rng)
        else:
            rejected = wrong_answer(instr, rng)
        records.append({"prompt": instr.text, "chosen": concise_answer(instr), "rejected": rejected,
                        "category": instr.category})
    return records


def judge(instruction: Instruction, answer: str) -> Verdict:
    """Grade an answer to an instruction.

    Let t = answer.strip() (so a leading space, as in " " + text, is ignored).
      correct: the first sentence of t (the text before the first '.', '!', '?' or newline, stripped)
               equals the expected answer, ignoring case.
      concise: t minus at most one trailing '.' is non-empty and contains no '.', '!', '?' or newline
               (the task's rambling is written in sentences; a run of words without a sentence end counts
               as concise, and is correct only where it is the answer itself).
      score:   1.0 if correct and concise, 0.5 if correct but not concise, 0.0 if wrong.
    """
    text = answer.strip()
    end = min((i for i, ch in enumerate(text) if ch in SENTENCE_ENDS), default=len(text))
    correct = text[:end].strip().casefold() == instruction.answer.casefold()
    body = text[:-1] if text.endswith(".") else text
    concise = bool(body.strip()) and not any(ch in SENTENCE_ENDS for ch in body)
    score = (1.0 if concise else 0.5) if correct else 0.0
    return Verdict(correct=correct, concise=concise, score=score, category=instruction.category)


def compare(instruction: Instruction, answer_a: str, answer_b: str) -> float:
    """1.0 if answer_a is judged better than answer_b, 0.0 if worse, 0.5 for a tie.

    Correct beats wrong; among answers that are both correct, concise beats rambling; two wrong
    answers, or two answers of the same kind, tie. compare(a, b) == 1 - compare(b, a).
    """
    score_a, score_b = judge(instruction, answer_a).score, judge(instruction, answer_b).score
    return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5

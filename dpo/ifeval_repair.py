"""Repairs of IFEval responses: a response rewritten so that it follows its prompt's constraints, for online and
iterative DPO's `--repair-ties`. When every sample of a prompt misses, no pair can be ranked out of them; the pair
(a sample repaired, the same sample) still teaches the constraint, and differs from the sample only where the
constraint asks it to.

Each rewrite changes the response the least it can; it adds only the constraint's own words (and, for a postscript,
the one sentence POSTSCRIPT):

    change_case:english_lowercase / english_capital   the response lower- / upper-cased
    punctuation:no_comma                              its commas dropped
    startend:quotation                                the response wrapped in double quotation marks
    startend:end_checker                              the end phrase appended, as a paragraph of its own
    detectable_content:postscript                     a postscript with the asked marker appended (POSTSCRIPT)
    detectable_format:title                           the words of its first sentence of 3 or more words
                                                      (up to TITLE_WORDS) as a <<title>>
    detectable_format:number_bullet_lists             its list of that length with '*' markers, or else its
                                                      sentences, in order, cut into that many bullets
    length_constraints:number_words ("less than")     its leading sentences that stay under the count, as they are
                                                      written (none when the first alone reaches it: no sentence
                                                      is cut)

Other types (keywords, at least N words, ...) have no repair: they would need new content. Only the constraints a
response misses are rewritten, and a repair counts only when IFEval's own checkers pass it strictly on every
constraint of the prompt.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from itertools import islice, permutations
from typing import Any

from dpo.ifeval import IFEvalPrompt, verdicts

POSTSCRIPT = "I hope this helps."
TITLE_WORDS = 8
TITLE_MIN_WORDS = 3
REPAIR_ORDERS = 24  # orders of the constraints a repair tries: every one of up to 4 constraints
SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
LIST_MARKER = re.compile(r"^[ \t]*(?:[*\-+•]|\d+[.)])[ \t]+", flags=re.MULTILINE)
WORD = re.compile(r"\w+")  # IFEval's word count (instructions_util.count_words: RegexpTokenizer(r"\w+"))

Repair = Callable[[str, dict[str, Any]], "str | None"]


def sentences(text: str) -> list[str]:
    """The text's sentences and lines, in order, list markers removed."""
    return [s.strip() for s in SENTENCE_END.split(LIST_MARKER.sub("", text)) if s.strip()]


def title(text: str, args: dict[str, Any]) -> str | None:
    """detectable_format:title: a <<title>> line of the response's own words put before it."""
    candidates = [WORD.findall(part) for part in sentences(text)] or [[]]
    words = next((w for w in candidates if len(w) >= TITLE_MIN_WORDS), candidates[0])  # not "Sure!"
    if not words:
        return None
    return f"<<{' '.join(words[:TITLE_WORDS])}>>\n\n{text.lstrip()}"


def bullets(text: str, args: dict[str, Any]) -> str | None:
    """detectable_format:number_bullet_lists: the response as exactly `num_bullets` '*' bullets, or None."""
    n = args["num_bullets"]
    if n < 1:
        return None  # "exactly 0 bullet points": the list would have to be rewritten as prose
    items = LIST_MARKER.findall(text)
    if len(items) == n:  # a list of the asked length already: its markers made '*' bullets
        return LIST_MARKER.sub("* ", text)
    parts = [part for part in sentences(text) if WORD.search(part)]  # not a "---" rule: it would be an empty bullet
    if len(parts) < n:
        return None
    cuts = [round(i * len(parts) / n) for i in range(n + 1)]
    return "\n".join("* " + " ".join(parts[cuts[i]:cuts[i + 1]]) for i in range(n))


def fewer_words(text: str, args: dict[str, Any]) -> str | None:
    """length_constraints:number_words, "less than": the response's leading part under the count, or None."""
    if args.get("relation") != "less than":
        return None  # "at least" N words would need words the response does not have
    kept, end = "", 0
    for part in sentences(text):  # each is found in the text as it is: markers and newlines stay
        end = text.index(part, end) + len(part)
        if len(WORD.findall(text[:end])) >= args["num_words"]:
            break
        kept = text[:end]
    return kept.strip() or None  # never the first sentence cut: trained as a whole answer, it would end mid-way


def quoted(text: str, args: dict[str, Any]) -> str:
    """startend:quotation: the response wrapped in double quotation marks (its own outer ones dropped first)."""
    return '"' + text.strip().strip('"').strip() + '"'


REPAIRS: dict[str, Repair] = {
    "change_case:english_lowercase": lambda text, args: text.lower(),
    "change_case:english_capital": lambda text, args: text.upper(),
    "punctuation:no_comma": lambda text, args: text.replace(",", ""),
    "startend:quotation": quoted,
    "startend:end_checker": lambda text, args: f"{text.rstrip()}\n\n{args['end_phrase']}",
    "detectable_content:postscript": lambda text, args: f"{text.rstrip()}\n\n{args['postscript_marker']} {POSTSCRIPT}",
    "detectable_format:title": title,
    "detectable_format:number_bullet_lists": bullets,
    "length_constraints:number_words": fewer_words,
}


def repair(prompt: IFEvalPrompt, response: str) -> str | None:
    """`response` rewritten to follow every constraint of `prompt` (each one it misses rewritten in turn), or None: a
    missed constraint with no repair, a repair that the checkers still fail, or a response that follows them all.
    The constraints are rewritten in the prompt's order, else in the first other order that passes (of the first
    REPAIR_ORDERS: all of them for up to 4 constraints): a postscript appended after lower-casing breaks "all
    lowercase", one appended before is lower-cased with the rest."""
    if not response.strip() or all(verdicts(prompt, response)[0]):
        return None
    for order in islice(permutations(range(len(prompt.instruction_id_list))), REPAIR_ORDERS):
        if (text := rewritten(prompt, response, order)) is not None:
            return text
    return None


def rewritten(prompt: IFEvalPrompt, response: str, order: Sequence[int]) -> str | None:
    """`response` with each constraint of `prompt` it misses rewritten, in `order`, if every one passes after."""
    text = response
    for i in order:
        if verdicts(prompt, text)[0][i]:
            continue  # followed already (a keyword that is there needs no rewrite)
        rewrite = REPAIRS.get(prompt.instruction_id_list[i])
        fixed = rewrite(text, dict(prompt.kwargs[i])) if rewrite is not None else None
        if fixed is None:
            return None
        text = fixed
    text = text.strip()  # as it is trained (and as IFEval's own evaluation strips a response)
    return text if text and all(verdicts(prompt, text)[0]) else None

"""Answers that loop: some `REPEAT_RUN` consecutive words occurring `REPEAT_TIMES` times or more.

The loops a small model falls into ("the beauty and the beauty and ...", a title written twenty times) until its
token budget runs out. `dpo.evaluate` reports the share of each model's answers that loop, and IFEval's strict
accuracy with a looping answer counted as a miss (a loop can pass a format checker without answering).
"""

from __future__ import annotations

from collections import Counter

REPEAT_RUN = 6  # words
REPEAT_TIMES = 3


def repeats_itself(text: str, run: int = REPEAT_RUN, times: int = REPEAT_TIMES) -> bool:
    """Whether some `run` consecutive words occur `times` times or more in `text` (overlapping occurrences count)."""
    words = text.split()
    counts = Counter(tuple(words[i:i + run]) for i in range(len(words) - run + 1))
    return max(counts.values(), default=0) >= times

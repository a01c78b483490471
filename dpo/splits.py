"""A run's preference data: the train and eval splits its settings select, tokenized (`load_preference_pairs`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Callable

from dpo.data import (DataError, TokenizedPair, available_splits, build_pairs, instruction_records, load_records,
                      prompt_key, select_subset, texts_digest, train_test_split)
from dpo.judges import IFEVAL_JUDGES
from dpo.train_settings import TrainSettings


@dataclass
class PreferenceData:
    """A run's tokenized train and eval pairs, and the train records' instructions (what online DPO samples)."""

    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    # the train records' distinct instructions (online DPO), each with the row and record it came from (a judge
    # such as IFEval's reads the record's other fields)
    instruction_rows: dict[str, tuple[int, Any]] = field(default_factory=dict)
    instructions_left_out: int = 0  # multi-turn, unreadable or unrenderable records among them
    # the fingerprint of the records split off with --test-size (None: the source's own eval split), recorded with
    # the run so that dpo.evaluate can tell whether it draws the same pairs again
    held_out_digest: str | None = None

    @property
    def instructions(self) -> list[str]:
        """The train records' distinct single-turn instructions, in first-seen order."""
        return list(self.instruction_rows)


def splits_off(splits: list[str] | None, eval_split: str | None) -> bool:
    """Whether a run holds out --test-size of its training records: its source (with `splits`, None for a single
    file) has no split named `eval_split`."""
    return not (eval_split and splits is not None and eval_split in splits)


def held_out_digest(indexed: list[tuple[int, Any]]) -> str:
    """A fingerprint of the (row, record)s split off: equal exactly when the same records, in the same order."""
    return texts_digest([json.dumps(record, sort_keys=True, default=str) for _, record in indexed])


# how --test-size splits a source: "prompt" keeps the pairs of one prompt on one side (runs that record no
# held_out_by split pair by pair, and dpo.evaluate draws their held-out pairs so)
HELD_OUT_BY = "prompt"


def split_records(dataset: str, train_split: str, eval_split: str | None, test_size: float, seed: int,
                  by: str | None = HELD_OUT_BY) -> tuple[list[tuple[int, Any]], str, list[tuple[int, Any]], str]:
    """The (row in the source, record)s a run trains on and those it holds out, each with a description: the
    source's eval split where it has one, else `test_size` of the training records split off with `seed`, the
    records of one prompt on one side (`by` "prompt"; None: record by record, as runs of earlier versions did). A
    skipped row is then named by its place in the file, not in the split."""
    splits = available_splits(dataset)
    records, description = load_records(dataset, train_split if splits is not None else None)
    indexed = list(enumerate(records))
    if not splits_off(splits, eval_split):
        eval_records, eval_description = load_records(dataset, eval_split)
        return indexed, description, list(enumerate(eval_records)), eval_description
    keys = [prompt_key(record, row) for row, record in indexed] if by == "prompt" else None
    indexed, eval_indexed = train_test_split(indexed, test_size if test_size < 1 else int(test_size), seed=seed,
                                             keys=keys)
    return indexed, description, eval_indexed, f"{len(eval_indexed)} pairs split off {dataset} (--test-size {test_size})"


def load_preference_pairs(cfg: TrainSettings, tokenizer, log: Callable[..., None] = print) -> PreferenceData:
    """The train and eval pairs --dataset and the split settings select (--train-split, --eval-split or
    --test-size, --num-pairs, --max-eval-pairs), rendered and tokenized as --template and the lengths say."""
    splits = available_splits(cfg.dataset)
    if splits is not None and cfg.train_split not in splits:
        raise DataError(f"{cfg.dataset}: no split {cfg.train_split!r} (available: {', '.join(splits)}); "
                        f"set --train-split")
    if splits is not None and cfg.eval_split == cfg.train_split:
        raise DataError(f"{cfg.dataset}: --eval-split {cfg.eval_split!r} is the training split: the held-out pairs "
                        "would be pairs the run trains on; name another split")
    indexed, description, eval_indexed, eval_description = split_records(cfg.dataset, cfg.train_split, cfg.eval_split,
                                                                         cfg.test_size, cfg.seed)
    digest = held_out_digest(eval_indexed) if splits_off(splits, cfg.eval_split) else None
    indexed = select_subset(indexed, cfg.num_pairs, seed=cfg.seed if cfg.subset == "random" else None)
    eval_indexed = select_subset(eval_indexed, cfg.max_eval_pairs)
    records, eval_records = [record for _, record in indexed], [record for _, record in eval_indexed]
    common = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                  truncation_mode=cfg.truncation_mode, template=cfg.template)
    # online and iterative DPO sample their pairs: prompt-only records (IFEval's) are enough for them
    common["allow_empty"] = cfg.on_policy.enabled
    train, stats = build_pairs(records, tokenizer, source=description, rows=[row for row, _ in indexed], **common)
    evaluation, eval_stats = build_pairs(eval_records, tokenizer, source=eval_description,
                                         rows=[row for row, _ in eval_indexed], **common)
    for split, where, pairs, rows, counts in (("train", description, train, records, stats),
                                              ("eval", eval_description, evaluation, eval_records, eval_stats)):
        sampled = cfg.on_policy.enabled and not pairs  # prompts only: the run samples its pairs
        log(f"{split}: {where}: " + (f"{len(rows)} prompts, no pairs (the run samples its own)" if sampled else
                                     str(counts)))
    # what the run samples is rendered now, as sampling will: an instruction the template cannot render is left out
    rendered = dict(template=cfg.template, tokenizer=tokenizer) if cfg.on_policy.enabled else {}
    checked = cfg.on_policy.enabled and cfg.on_policy.judge in IFEVAL_JUDGES  # a judge that keys prompts by text
    return PreferenceData(train, evaluation, *instruction_records(records, [row for row, _ in indexed], **rendered,
                                                                  source=cfg.dataset, constraints=checked),
                          held_out_digest=digest)

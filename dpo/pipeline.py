"""Run set-up shared by train.py and the tools: the output directory and the train/eval pairs of a config."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from dpo.config import ConfigError, TrainConfig
from dpo.errors import first_line
from dpo.data import (BUILTIN_SOURCES, DataError, TokenizedPair, build_pairs, instructions_of, load_records,
                      select_subset, train_test_split)


def prepare_output_dir(out_dir: Path, *, resume: bool, overwrite: bool) -> None:
    """Create --output-dir; never reuse a directory holding a run silently."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output-dir {out_dir} is a file, not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not resume:
        if not overwrite:
            raise ConfigError(f"--output-dir {out_dir} already holds files; pass --resume to continue that run "
                              f"or --overwrite to replace it")
        shutil.rmtree(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise ConfigError(f"--output-dir {out_dir} is not writable ({error.strerror or error})") from None


def check_disk_space(out_dir: Path, trained_params: int, final_params: int, keep: int,
                     free_bytes: int | None = None) -> None:
    """Fail before training when `keep` checkpoints (the trained weights and 2 AdamW moments each) and final/
    (`final_params` weights) cannot fit."""
    needed = trained_params * 4 * 3 * keep + final_params * 4
    free = shutil.disk_usage(out_dir).free if free_bytes is None else free_bytes
    if free < needed:
        raise ConfigError(f"--output-dir {out_dir}: {free / 2**30:.2f} GiB free, but {keep} checkpoint(s) and "
                          f"final/ need about {needed / 2**30:.2f} GiB; free space or lower --save-total-limit")


def available_splits(source: str) -> list[str] | None:
    """Split names of a source, or None for a single file (which has no splits)."""
    if source in BUILTIN_SOURCES:
        return list(BUILTIN_SOURCES[source].splits)
    path = Path(source)
    if path.is_file():
        return None
    if path.suffix in (".jsonl", ".json", ".parquet") or (source.startswith((".", "/", "~")) and not path.exists()):
        raise DataError(f"{source}: file not found")
    import datasets

    try:
        return list(datasets.get_dataset_split_names(source))
    except Exception as error:
        raise DataError(f"{source}: cannot read the dataset's splits ({first_line(error)})") from None


@dataclass
class PreferenceData:
    train: list[TokenizedPair]
    eval: list[TokenizedPair]
    instructions: list[str] = field(default_factory=list)  # the train records' distinct instructions (online DPO)
    instructions_left_out: int = 0  # multi-turn or unreadable records among them


def load_preference_pairs(cfg: TrainConfig, tokenizer, log: Callable[..., None] = print) -> PreferenceData:
    splits = available_splits(cfg.dataset)
    if splits is not None and cfg.train_split not in splits:
        raise DataError(f"{cfg.dataset}: no split {cfg.train_split!r} (available: {', '.join(splits)}); "
                        f"set --train-split")
    records, description = load_records(cfg.dataset, cfg.train_split if splits is not None else None)
    if cfg.eval_split and splits is not None and cfg.eval_split in splits:
        eval_records, eval_description = load_records(cfg.dataset, cfg.eval_split)
    else:
        records, eval_records = train_test_split(records, cfg.test_size if cfg.test_size < 1 else int(cfg.test_size),
                                                 seed=cfg.seed)
        eval_description = f"{len(eval_records)} pairs split off {cfg.dataset} (--test-size {cfg.test_size})"
    records = select_subset(records, cfg.num_pairs, seed=cfg.seed if cfg.subset == "random" else None)
    eval_records = select_subset(eval_records, cfg.max_eval_pairs)
    common = dict(max_length=cfg.max_length, max_prompt_length=cfg.max_prompt_length,
                  truncation_mode=cfg.truncation_mode, template=cfg.template)
    train, stats = build_pairs(records, tokenizer, source=description, **common)
    log(f"train: {description}: {stats}")
    evaluation, eval_stats = build_pairs(eval_records, tokenizer, source=eval_description, **common)
    log(f"eval: {eval_description}: {eval_stats}")
    return PreferenceData(train, evaluation, *instructions_of(records))

"""Evaluate a DPO policy against its reference model.

    python -m dpo.evaluate --model runs/demo/final        # the demo: vs the run's starting model, demo judge
    python -m dpo.evaluate --model RUN/final --reference MODEL --judge REWARD_MODEL --prompts eval.json
    python -m dpo.evaluate --model RUN/final --implicit-reward --dataset demo --split test

Pairwise win rate. Policy and reference each answer the same held-out instructions (the judge's own, e.g.
the demo's held-out prompts, or --prompts FILE) with the same seeded decoding, by default the card's
(temperature 0.7, top-p 0.9). The judge compares every pair of answers: a win (1), a tie (1/2) or a loss
(0) for the policy. With W wins, T ties and L losses out of n = W + T + L,

    win rate  p = (W + T/2) / n
    95% CI    Wilson score interval with z = 1.96:
              center    = (p + z^2/(2n)) / (1 + z^2/n)
              half width = z / (1 + z^2/n) * sqrt(p(1 - p)/n + z^2/(4n^2))
              i.e. the two p' with (p - p')^2 = z^2 p'(1 - p')/n.

The interval treats each comparison as a Bernoulli trial. An outcome X in {0, 1/2, 1} has mean p and
variance E[X^2] - p^2 <= p - p^2 = p(1 - p) (as X^2 <= X), so the Bernoulli variance is an upper bound:
with ties the interval is conservative (no narrower than the truth warrants).

Implicit reward. On a preference split, with r = beta * (log pi(y|x) - log ref(y|x)) summed over the
response tokens, for chosen (r_c) and rejected (r_r) responses:

    accuracy = mean 1[r_c > r_r],  margin = mean (r_c - r_r),  loss = mean -log sigmoid(r_c - r_r)

beta, the template and the length limits are the run's settings (final/dpo_run.json). The implicit reward
builds its pairs with them exactly as training did, by default from the pairs the run held out: its eval split, or
the --test-size pairs train.py split off a source without one (a single file), drawn again with the run's
test_size and seed. Generation prompts both models as the policy was trained (dpo.prompts), an over-long prompt
cut as training cuts it, and --chat-template, --max-prompt-length and --truncation-mode override the run's prompt
settings for generation only (see dpo.generation).
The reference defaults to the model the run started from (dpo_run.json's "reference_model", found from anywhere by
its "reference_model_path" where it was a relative path; a TR-DPO run's moved
reference is not kept, so its rewards are measured against the model it started from). An LD-DPO run's rewards
weigh the tokens beyond the pair's shorter response by its ld_alpha, as it trained.
The report ends with one JSON line holding every number.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from dpo.cli import exit_quietly_on_interrupt  # light: it comes before the heavy imports below

if __name__ == "__main__":
    exit_quietly_on_interrupt()  # Ctrl-C in their seconds: `interrupted`, not a traceback

import torch
import torch.nn.functional as F
import transformers

from dpo.cli import ArgumentParser, DefaultsHelpFormatter, run_cli
from dpo.train_settings import TrainSettings
from dpo.data import DataError, available_splits, build_pairs, collate_pairs, load_records, select_subset
from dpo.precision import PRECISIONS
from dpo.generation import (MAX_NEW_TOKENS, RUN_SETTINGS_FILE, TEMPERATURE, TOP_P, DecodingSettings,
                            add_prompt_arguments, check_output_file, generate_batch, generator_name,
                            load_checked_tokenizer, model_prompt_budget, read_instructions, resolve_device,
                            resolve_dtype, resolve_run_model, run_reference_model, run_settings, side_by_side,
                            write_output_text)
from dpo.errors import UserError
from dpo.gguf import gguf_file, is_gguf
from dpo.ifeval import echoed_constraint
from dpo.judges import JUDGE_HELP, IFEvalJudge, Judge, JudgeError, build_judge, prompt_records
from dpo.logprobs import sequence_logps
from dpo.loss import LossSettings
from dpo.modeling import ModelLoadError, load_causal_lm, resolve_model_path
from dpo.repetition import REPEAT_RUN, REPEAT_TIMES, repeats_itself
from dpo.splits import held_out_digest, split_records, splits_off

Z_95 = 1.959963984540054  # the 97.5% quantile of the standard normal


class EvaluationError(UserError):
    """An evaluation that cannot run as asked, in one line."""


# ---------------------------------------------------------------------------------------------------
# Win-rate arithmetic


def wilson_interval(p_hat: float, n: int, z: float = Z_95) -> tuple[float, float]:
    """Wilson score interval of a proportion p_hat observed over n trials (see the module docstring)."""
    if n < 1:
        raise ValueError(f"the Wilson interval needs n >= 1, got {n}")
    if not 0.0 <= p_hat <= 1.0:
        raise ValueError(f"p_hat must be in [0, 1], got {p_hat}")
    z2 = z * z
    denominator = 1.0 + z2 / n
    center = (p_hat + z2 / (2 * n)) / denominator
    half_width = z / denominator * math.sqrt(p_hat * (1.0 - p_hat) / n + z2 / (4 * n * n))
    return max(0.0, center - half_width), min(1.0, center + half_width)


@dataclass(frozen=True)
class WinRate:
    """Wins, ties and losses of the policy against the reference."""

    wins: int
    ties: int
    losses: int

    @classmethod
    def from_outcomes(cls, outcomes: Sequence[float]) -> "WinRate":
        """Outcomes are the judge's 1.0 (win), 0.5 (tie) or 0.0 (loss) for the policy."""
        bad = [o for o in outcomes if o not in (0.0, 0.5, 1.0)]
        if bad:
            raise ValueError(f"a judge outcome must be 1.0, 0.5 or 0.0, got {bad[0]!r}")
        return cls(wins=sum(o == 1.0 for o in outcomes), ties=sum(o == 0.5 for o in outcomes),
                   losses=sum(o == 0.0 for o in outcomes))

    @property
    def n(self) -> int:
        """The number of comparisons."""
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float:
        """(W + T/2) / n; a ValueError when there are no comparisons."""
        if self.n == 0:
            raise ValueError("no comparisons: the win rate is undefined")
        return (self.wins + 0.5 * self.ties) / self.n

    @property
    def interval(self) -> tuple[float, float]:
        """The Wilson 95% interval of the win rate."""
        return wilson_interval(self.win_rate, self.n)

    def to_dict(self) -> dict[str, float | int]:
        """The win rate, its interval and the counts, as plain values."""
        low, high = self.interval
        return {"win_rate": self.win_rate, "ci_low": low, "ci_high": high, "wins": self.wins, "ties": self.ties,
                "losses": self.losses, "n": self.n}


# ---------------------------------------------------------------------------------------------------
# Pairwise comparison


@dataclass
class Comparison:
    """One prompt's two answers, the judge's outcome for the policy and its scores and checks of each."""

    instruction: str
    category: str | None
    policy_output: str
    reference_output: str
    outcome: float  # for the policy: 1 win, 0.5 tie, 0 loss
    policy_score: float | None = None  # the judge's absolute scores, where it has them
    reference_score: float | None = None
    policy_checks: dict[str, bool] | None = None  # the judge's yes/no properties (the demo's: correct, concise)
    reference_checks: dict[str, bool] | None = None


@dataclass
class LoadedModel:
    """A model ready to generate: its display name, its resolved path, the model and its tokenizer."""

    name: str
    path: str
    model: Any
    tokenizer: Any


def check_model(name: str) -> None:
    """A ModelLoadError when `name` (a model, or a run directory standing for its final/) is a local model that is
    missing or unusable (dpo.modeling's checks: a directory that does not exist, a file, no config.json), or a GGUF
    model whose file is not there (dpo.gguf's), before anything is loaded. A hub name is left to loading; so is
    converting a GGUF file."""
    if is_gguf(name):
        gguf_file(name)
    else:
        resolve_model_path(resolve_run_model(name))


def load_model(name: str, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    """A trained run's final/ (or any model) with its tokenizer, in eval mode on `device`."""
    path = resolve_run_model(name)
    tokenizer = load_checked_tokenizer(path)
    model = load_causal_lm(path, dtype=dtype, device=device).eval()
    return LoadedModel(generator_name(path), path, model, tokenizer)


def compare_models(policy: LoadedModel, reference: LoadedModel, prompts: Sequence[dict[str, Any]], judge: Judge,
                   decoding: DecodingSettings, *, batch_size: int = 32, progress: bool = False) -> list[Comparison]:
    """Both models answer every prompt (same seeded decoding); the judge compares each pair."""
    instructions = [row["instruction"] for row in prompts]
    # categories first: a prompt the judge cannot handle fails before any generation
    categories = [judge.category(text) or row.get("category") for text, row in zip(instructions, prompts)]
    policy_outputs = generate_batch(policy.model, policy.tokenizer, instructions, decoding, batch_size=batch_size,
                                    progress=progress, description=f"policy {policy.name}")
    reference_outputs = generate_batch(reference.model, reference.tokenizer, instructions, decoding,
                                       batch_size=batch_size, progress=progress,
                                       description=f"reference {reference.name}")
    comparisons = []
    for text, category, mine, theirs in zip(instructions, categories, policy_outputs, reference_outputs):
        comparisons.append(Comparison(text, category, mine, theirs, judge.compare(text, mine, theirs),
                                      judge.score(text, mine), judge.score(text, theirs),
                                      judge.checks(text, mine), judge.checks(text, theirs)))
    return comparisons


def mean_lengths(texts: Sequence[str], tokenizer: Any) -> dict[str, float]:
    """Mean whitespace-separated words and mean tokens (the model's own tokenizer) per text."""
    if not texts:
        return {"words": 0.0, "tokens": 0.0}
    tokens = tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return {"words": sum(len(t.split()) for t in texts) / len(texts),
            "tokens": sum(len(ids) for ids in tokens) / len(texts)}


def format_repetition(summary: dict[str, Any]) -> str:
    """One line with the share of each model's answers that repeat themselves; empty when none does."""
    policy, reference = summary["policy_repeating"], summary["reference_repeating"]
    if not policy and not reference:
        return ""
    return (f"answers repeating {REPEAT_RUN} words {REPEAT_TIMES}+ times: policy {policy:.3f}, "
            f"reference {reference:.3f}")


def win_rate_summary(comparisons: Sequence[Comparison], policy: LoadedModel,
                     reference: LoadedModel) -> dict[str, Any]:
    """The overall and per-category win rates, mean answer lengths, mean judge scores, check rates and shares of
    answers that repeat themselves, of both models."""
    overall = WinRate.from_outcomes([c.outcome for c in comparisons])
    summary: dict[str, Any] = overall.to_dict()
    for prefix, model, outputs in (("policy", policy, [c.policy_output for c in comparisons]),
                                   ("reference", reference, [c.reference_output for c in comparisons])):
        lengths = mean_lengths(outputs, model.tokenizer)
        summary[f"{prefix}_mean_words"] = lengths["words"]
        summary[f"{prefix}_mean_tokens"] = lengths["tokens"]
        summary[f"{prefix}_repeating"] = sum(map(repeats_itself, outputs)) / len(outputs) if outputs else 0.0
        scores = [getattr(c, f"{prefix}_score") for c in comparisons]
        if all(score is not None for score in scores):
            summary[f"{prefix}_mean_score"] = sum(scores) / len(scores)
    summary.update(check_rates(comparisons))
    categories = sorted({c.category for c in comparisons if c.category is not None})
    if categories:
        summary["categories"] = {}
        for category in categories:
            subset = [c for c in comparisons if c.category == category]
            summary["categories"][category] = {
                **WinRate.from_outcomes([c.outcome for c in subset]).to_dict(),
                "policy_mean_words": mean_lengths([c.policy_output for c in subset], policy.tokenizer)["words"],
                "reference_mean_words": mean_lengths([c.reference_output for c in subset],
                                                     reference.tokenizer)["words"],
                **check_rates(subset)}
    return summary


def check_rates(comparisons: Sequence[Comparison]) -> dict[str, float]:
    """The share of answers with each of the judge's yes/no properties: policy_correct, reference_concise, ..."""
    rates: dict[str, float] = {}
    for side in ("policy", "reference"):
        checks = [getattr(c, f"{side}_checks") for c in comparisons]
        if checks and all(checks):
            for name in checks[0]:
                rates[f"{side}_{name}"] = sum(bool(c[name]) for c in checks) / len(checks)
    return rates


def format_checks(summary: dict[str, Any]) -> str:
    """Per category and overall: the share of policy and reference answers with each yes/no property."""
    names = [key[len("policy_"):] for key in summary if key.startswith("policy_") and f"reference_{key[7:]}" in summary
             and key[7:] not in ("mean_words", "mean_tokens", "mean_score", "repeating")]
    if not names:
        return ""
    rows = list(summary.get("categories", {}).items()) + [("all", summary)]
    width = label_width(label for label, _ in rows)
    header = f"{'':{width}}" + "".join(f"{name + ' policy':>18}{'reference':>11}" for name in names)
    lines = [header] + [f"{label:{width}}" + "".join(f"{s[f'policy_{n}']:>18.2f}{s[f'reference_{n}']:>11.2f}"
                                                     for n in names) for label, s in rows]
    return "\n".join(lines)


def label_width(labels: Iterable[str]) -> int:
    """The width of a table's label column: 14, or the longest label and a space (IFEval's types run longer)."""
    return max([14] + [len(label) + 1 for label in labels])


def format_win_rate(summary: dict[str, Any], policy: str, reference: str) -> str:
    """The win-rate table (per category, then all) and the mean output lengths, as text."""
    width = label_width(summary.get("categories", {}))
    header = f"{'':{width}}{'n':>5}{'wins':>6}{'ties':>6}{'losses':>8}{'win rate':>10}   95% CI"

    def row(label: str, s: dict[str, Any]) -> str:
        return (f"{label:{width}}{s['n']:>5}{s['wins']:>6}{s['ties']:>6}{s['losses']:>8}{s['win_rate']:>10.3f}"
                f"   [{s['ci_low']:.3f}, {s['ci_high']:.3f}]")

    lines = [header] + [row(name, s) for name, s in summary.get("categories", {}).items()]
    lines.append(row("all", summary))
    has_score = "policy_mean_score" in summary
    lines += ["", f"{'mean output':24}{'words':>8}{'tokens':>8}" + (f"{'judge score':>13}" if has_score else "")]
    for prefix, name in (("policy", policy), ("reference", reference)):
        score = f"{summary[f'{prefix}_mean_score']:>13.3f}" if has_score else ""
        lines.append(f"{prefix + ' ' + name:24.24}{summary[f'{prefix}_mean_words']:>8.1f}"
                     f"{summary[f'{prefix}_mean_tokens']:>8.1f}{score}")
    return "\n".join(lines)


def format_samples(comparisons: Sequence[Comparison], k: int, policy: str, reference: str) -> str:
    """The first k comparisons (in evaluation order, not chosen by outcome), reference left, policy right."""
    verdict = {1.0: "policy wins", 0.5: "tie", 0.0: "reference wins"}
    blocks = []
    for c in comparisons[:k]:
        blocks.append(f"### Human: {c.instruction}   ({verdict[c.outcome]})\n"
                      + side_by_side(f"before: {reference}", c.reference_output, f"after: {policy}",
                                     c.policy_output))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------------
# IFEval's accuracies


IFEVAL_METRICS = (("prompt_strict", "prompt-level strict"), ("prompt_loose", "prompt-level loose"),
                  ("instruction_strict", "instruction-level strict"), ("instruction_loose", "instruction-level loose"))


def proportion(passed: int, n: int) -> dict[str, float | int]:
    """passed / n with its 95% Wilson interval."""
    low, high = wilson_interval(passed / n, n) if n else (0.0, 1.0)
    return {"rate": passed / n if n else 0.0, "low": low, "high": high, "passed": passed, "n": n}


def clustered_proportion(clusters: Sequence[tuple[int, int]]) -> dict[str, float | int]:
    """sum(passed) / sum(n) over clusters (passed, n) that need not be independent inside (a prompt's constraints
    pass or fail together more often than apart), with a Wilson interval over the effective number of trials:
    n_eff = p (1 - p) / V, V = sum_i (passed_i - p n_i)^2 / (sum_i n_i)^2 the ratio estimator's linearized variance
    (Kish's design effect), at most sum(n). Clusters of one trial give n_eff = n: the plain Wilson interval."""
    passed, n = sum(c[0] for c in clusters), sum(c[1] for c in clusters)
    result = proportion(passed, n)
    if n and any(m > 1 for _, m in clusters):
        p = passed / n
        variance = sum((y - p * m) ** 2 for y, m in clusters) / n ** 2
        effective = min(float(n), p * (1.0 - p) / variance) if variance > 0 else float(n)
        result["low"], result["high"] = wilson_interval(p, effective)
        result["effective_n"] = effective
    else:
        result["effective_n"] = float(n)
    return result


def ifeval_summary(judge: IFEvalJudge, instructions: Sequence[str], answers: Sequence[str]) -> dict[str, Any]:
    """IFEval's four accuracies of one model's answers, overall and per constraint type, each with its interval:
    prompt level (a prompt counts when all its constraints pass; per type, over the prompts that have the type) and
    instruction level (each constraint counts; its interval allows for the constraints of one prompt passing or
    failing together: clustered_proportion), strict and loose (dpo.ifeval); the share of answers that copy a
    constraint's description (dpo.ifeval.echoed_constraint); prompt-level strict with copies counted as misses, and
    with copies or loops (dpo.repetition.repeats_itself) counted as misses: both pass format checkers without
    answering."""
    # type ("" overall) -> metric -> prompt index -> [passed, n]: a prompt's constraints are one cluster
    counts: dict[str, dict[str, dict[int, list[int]]]] = {}

    def add(group: str, metric: str, passed: bool) -> None:
        cell = counts.setdefault(group, {name: {} for name, _ in IFEVAL_METRICS})[metric].setdefault(index, [0, 0])
        cell[0], cell[1] = cell[0] + int(passed), cell[1] + 1

    copies = strict_without_copies = strict_without_copies_or_loops = 0
    for index, (text, answer) in enumerate(zip(instructions, answers)):
        strict, loose = judge.verdicts(text, answer)
        prompt = judge.prompt(text)
        types = prompt.instruction_id_list
        copied = echoed_constraint(prompt, answer) is not None
        copies += copied
        strict_without_copies += all(strict) and not copied
        strict_without_copies_or_loops += all(strict) and not (copied or repeats_itself(answer))
        for group in ("", *dict.fromkeys(types)):
            add(group, "prompt_strict", all(strict))
            add(group, "prompt_loose", all(loose))
        for group, passed_strict, passed_loose in zip(types, strict, loose):
            for target in ("", group):
                add(target, "instruction_strict", passed_strict)
                add(target, "instruction_loose", passed_loose)
    summary = {name: clustered_proportion(list(counts.get("", {}).get(name, {}).values()))
               for name, _ in IFEVAL_METRICS}
    summary["copies_constraint"] = proportion(copies, len(answers))
    summary["prompt_strict_no_copy"] = proportion(strict_without_copies, len(answers))
    summary["prompt_strict_no_copy_or_loop"] = proportion(strict_without_copies_or_loops, len(answers))
    summary["types"] = {group: {name: clustered_proportion(list(cells[name].values())) for name, _ in IFEVAL_METRICS}
                        for group, cells in sorted(counts.items()) if group}
    return summary


def format_ifeval(policy: dict[str, Any], reference: dict[str, Any], policy_name: str, reference_name: str) -> str:
    """IFEval's four accuracies of both models side by side, overall then per constraint type, with intervals."""
    def cell(p: dict[str, Any]) -> str:
        return f"{p['rate']:.3f} [{p['low']:.3f}, {p['high']:.3f}]"

    groups = [("all", reference, policy)] + [(group, reference["types"][group], policy["types"][group])
                                             for group in policy["types"]]
    width = max(38, label_width(group for group, _, _ in groups) - 1)  # IFEval's longest type is 45 characters
    lines = [f"{'IFEval':<{width}} {'':<24} {'n':>4}  {'reference ' + reference_name[:20]:<24}  policy {policy_name}"]
    for group, theirs, mine in groups:
        for i, (name, label) in enumerate(IFEVAL_METRICS):
            lines.append(f"{group if i == 0 else '':<{width}} {label:<24} {mine[name]['n']:>4}  "
                         f"{cell(theirs[name]):<24}  {cell(mine[name])}")
    for name, label in (("copies_constraint", "answers copying a constraint's description"),
                        ("prompt_strict_no_copy", "prompt-level strict, a copy counted as a miss"),
                        ("prompt_strict_no_copy_or_loop", "prompt-level strict, a copy or a loop counted as a miss")):
        if name in policy and name in reference:
            lines.append(f"{label}: policy {cell(policy[name])}, reference {cell(reference[name])}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Implicit reward


@torch.no_grad()
def implicit_reward_metrics(policy: Any, reference: Any, pairs: Sequence[Any], *, beta: float, pad_id: int,
                            batch_size: int = 16, ld_alpha: float | None = None) -> dict[str, float]:
    """Means over pairs of the implicit-reward statistics in the module docstring; with `ld_alpha` (an LD-DPO
    run's) the log-probs the rewards compare are LD-DPO's, the log-likelihood per token stays every token's."""
    if not pairs:
        raise EvaluationError("no preference pairs to score")
    device = next(policy.parameters()).device
    chosen, rejected = [], []
    chosen_logps = {"policy": 0.0, "reference": 0.0}
    chosen_tokens = 0
    for start in range(0, len(pairs), batch_size):
        batch = {k: v.to(device) for k, v in collate_pairs(pairs[start:start + batch_size], pad_id).items()}
        n = batch["input_ids"].shape[0] // 2
        args = batch["input_ids"], batch["attention_mask"], batch["labels"]
        mine, theirs = (sequence_logps(model, *args, ld_alpha=ld_alpha) for model in (policy, reference))
        log_ratio = mine.sum - theirs.sum
        chosen.append(beta * log_ratio[:n])
        rejected.append(beta * log_ratio[n:])
        for name, logps in (("policy", mine), ("reference", theirs)):
            whole = logps.sum if logps.unweighted_sum is None else logps.unweighted_sum
            chosen_logps[name] += whole[:n].double().sum().item()
        chosen_tokens += int(mine.count[:n].sum())
    chosen_rewards, rejected_rewards = torch.cat(chosen).double(), torch.cat(rejected).double()
    margins = chosen_rewards - rejected_rewards
    return {"reward_accuracy": (margins > 0).double().mean().item(), "reward_margin": margins.mean().item(),
            "chosen_reward": chosen_rewards.mean().item(), "rejected_reward": rejected_rewards.mean().item(),
            "dpo_loss": F.softplus(-margins).mean().item(), "pairs": len(pairs), "beta": beta,
            # per-token log-likelihood of the preferred answers: does the policy still write them as likely?
            "policy_chosen_logp_per_token": chosen_logps["policy"] / max(chosen_tokens, 1),
            "reference_chosen_logp_per_token": chosen_logps["reference"] / max(chosen_tokens, 1)}


def load_eval_pairs(dataset: str, split: str | None, tokenizer: Any, settings: dict[str, Any],
                    max_pairs: int | None) -> tuple[list[Any], str, str | None]:
    """The tokenized pairs to score, built with the run's settings (train.py's defaults where it names none), a line
    describing them, and the split they are (None: a whole file). The run's own dataset, with `split` None or the
    run's eval split, gives the pairs the run held out: that split, or when the source has none the --test-size
    pairs train.py split off (as dpo.splits draws them), never pairs it trained on. --max-pairs takes the first
    `max_pairs` of them."""
    run = {**TrainSettings().to_dict(), **settings}  # train.py's defaults where the run's settings are silent
    splits = available_splits(dataset)
    own = same_source(dataset, run["dataset"]) or same_source(dataset, run.get("dataset_path"))
    if own and split in (None, run["eval_split"]) and splits_off(splits, run["eval_split"]):
        indexed, description, split = _split_off_pairs(dataset, splits, run)
    else:
        split = split or run["eval_split"]
        if splits is None and split != run["eval_split"]:
            raise DataError(f"{dataset}: a single file has no splits; leave out --split {split}")
        if splits is not None and split not in splits:
            raise DataError(f"{dataset}: no split {split!r} (available: {', '.join(splits)}); set --split")
        records, description = load_records(dataset, split if splits is not None else None)
        indexed, split = list(enumerate(records)), split if splits is not None else None
    indexed = select_subset(indexed, max_pairs)
    pairs, stats = build_pairs([record for _, record in indexed], tokenizer, max_length=run["max_length"],
                               max_prompt_length=run["max_prompt_length"], truncation_mode=run["truncation_mode"],
                               template=run["template"], source=description, rows=[row for row, _ in indexed])
    return pairs, f"{description}: {stats}", split


def run_dataset(settings: dict[str, Any]) -> str | None:
    """The run's --dataset as it was given, or where that was a relative path that is not there from here, the
    path train.py recorded from anywhere (dpo_run.json's dataset_path)."""
    dataset, path = settings.get("dataset"), settings.get("dataset_path")
    return path if dataset and path and not Path(dataset).exists() and Path(path).exists() else dataset


def same_source(dataset: str, other: str | None) -> bool:
    """Whether two --dataset values name the same data: the same name, or paths to the same file or directory."""
    if other is None:
        return False
    if dataset == other:
        return True
    return Path(dataset).exists() and Path(other).exists() and Path(dataset).resolve() == Path(other).resolve()


def _split_off_pairs(dataset: str, splits: list[str] | None, run: dict[str, Any]) -> tuple[list, str, str]:
    """The (row, record)s of the pairs a run split off its data with --test-size (its source has no eval split), a
    description in train.py's words, and a name for them: dpo.splits.split_records with the run's settings, as
    train.py drew them."""
    if splits is not None and run["train_split"] not in splits:
        raise DataError(f"{dataset}: no split {run['train_split']!r} (the run's train_split; available: "
                        f"{', '.join(splits)}); name the pairs to score with --split")
    _, _, indexed, description = split_records(dataset, run["train_split"], run["eval_split"], run["test_size"],
                                               run["seed"], by=run.get("held_out_by"))
    recorded = run.get("held_out_digest")  # runs of earlier versions recorded none
    if recorded is not None and held_out_digest(indexed) != recorded:
        raise DataError(f"{dataset} has changed since the run split off its held-out pairs (--test-size "
                        f"{run['test_size']}, seed {run['seed']}): drawn again they are not the pairs it held out "
                        "(and may be pairs it trained on); score the data as it was, or name pairs of your own with "
                        "--dataset")
    return indexed, description, f"held out by --test-size {run['test_size']} (seed {run['seed']})"


def format_implicit(metrics: dict[str, float]) -> str:
    """The implicit-reward metrics in one line."""
    return (f"implicit reward on {metrics['pairs']} pairs (beta {metrics['beta']}): accuracy "
            f"{metrics['reward_accuracy']:.3f}, margin {metrics['reward_margin']:.4f}, chosen "
            f"{metrics['chosen_reward']:.4f}, rejected {metrics['rejected_reward']:.4f}, "
            f"DPO loss {metrics['dpo_loss']:.4f}; log-likelihood of the chosen answers per token: policy "
            f"{metrics['policy_chosen_logp_per_token']:.4f}, reference {metrics['reference_chosen_logp_per_token']:.4f}")


# ---------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    """The command line of python -m dpo.evaluate."""
    parser = ArgumentParser(prog="python -m dpo.evaluate", description=__doc__.splitlines()[0],
                                     formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--model", required=True, help="the policy: a trained final/ (or its run directory)")
    parser.add_argument("--reference", help=f"the reference model (default: the run's starting model, "
                                            f"from {RUN_SETTINGS_FILE})")
    parser.add_argument("--judge", default="demo", help=JUDGE_HELP)
    parser.add_argument("--prompts", metavar="FILE", help="JSON / JSONL with 'instruction' fields "
                                                          "(default: the judge's held-out prompts)")
    parser.add_argument("--num-prompts", type=int, help="evaluate on this many prompts, drawn with --seed "
                                                        "(default: all)")
    parser.add_argument("--skip-win-rate", action="store_true", help="only the implicit reward")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE)
    parser.add_argument("--top-p", type=float, default=TOP_P)
    parser.add_argument("--top-k", type=int, default=0, help="0 turns top-k filtering off")
    parser.add_argument("--greedy", action="store_true")
    parser.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS)
    parser.add_argument("--seed", type=int, default=0, help="seeds the prompt draw and the decoding")
    add_prompt_arguments(parser)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=3, help="before/after samples to print")
    parser.add_argument("--output", metavar="FILE.json", help="also write the summary (with the implicit reward) and "
                                                              "every comparison here")
    parser.add_argument("--implicit-reward", action="store_true",
                        help="also measure reward accuracy and margins on a preference split")
    parser.add_argument("--dataset", help="preference data for --implicit-reward (default: the run's dataset)")
    parser.add_argument("--split", help="its split (default: the pairs the run held out: its eval split, or the "
                                        "--test-size pairs it split off a source without one)")
    parser.add_argument("--beta", type=float, help="beta of the implicit reward (default: the run's beta)")
    parser.add_argument("--max-pairs", type=int, help="score at most this many pairs (default: all)")
    parser.add_argument("--precision", choices=PRECISIONS, default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def draw_prompt_rows(path: str, count: int | None, seed: int, flag: str = "--num-prompts") -> list[dict[str, Any]]:
    """The rows of the prompts file `path`, `count` of them drawn with `seed` when it asks for fewer (in file order);
    more than the file holds is an error naming `flag`. One rule for `--prompts` here and training's --eval-prompts."""
    rows = read_instructions(path)
    if count is not None and count > len(rows):
        raise EvaluationError(f"{flag} {count}: {path} has {len(rows)} rows")
    if count is not None and count < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), count))
        rows = [rows[i] for i in keep]
    return rows


def read_prompt_rows(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The rows of --prompts, --num-prompts of them drawn with --seed when it asks for fewer."""
    return draw_prompt_rows(args.prompts, args.num_prompts, args.seed)


def _prompts(args: argparse.Namespace, judge: Judge) -> list[dict[str, Any]]:
    """The judge's own held-out prompts, --num-prompts of them (drawn with --seed)."""
    try:
        texts = judge.default_prompts(args.num_prompts, args.seed)
    except JudgeError as error:
        raise EvaluationError(f"--num-prompts {args.num_prompts}: {error}") from None
    if texts is None:
        raise EvaluationError(f"the judge {args.judge} has no prompts of its own; give --prompts FILE")
    return [{"instruction": text} for text in texts]


def check_args(args: argparse.Namespace) -> DecodingSettings:
    """The decoding settings of the arguments; an EvaluationError for a value out of range."""
    decoding = DecodingSettings.from_args(args)
    if args.num_prompts is not None and args.num_prompts < 1:
        raise EvaluationError(f"--num-prompts must be at least 1, got {args.num_prompts}")
    if args.batch_size < 1:
        raise EvaluationError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.samples < 0:
        raise EvaluationError(f"--samples must be >= 0, got {args.samples}")
    if args.skip_win_rate and not args.implicit_reward:
        raise EvaluationError("--skip-win-rate leaves nothing to do without --implicit-reward")
    if args.beta is not None and not args.beta > 0:
        raise EvaluationError(f"--beta must be positive, got {args.beta}")
    if args.max_pairs is not None and args.max_pairs < 1:
        raise EvaluationError(f"--max-pairs must be at least 1, got {args.max_pairs}")
    # a flag of a part that does not run would be ignored in silence
    if not args.implicit_reward and (unused := [f for f, v in (("--dataset", args.dataset), ("--split", args.split),
                                                               ("--beta", args.beta), ("--max-pairs", args.max_pairs))
                                                if v is not None]):
        raise EvaluationError(f"{unused[0]} is for --implicit-reward, which this command does not ask for")
    if args.skip_win_rate and (unused := [f for f, v in (("--prompts", args.prompts),
                                                         ("--num-prompts", args.num_prompts)) if v is not None]):
        raise EvaluationError(f"{unused[0]} is for the win rate, which --skip-win-rate leaves out")
    return decoding


def main(argv: list[str] | None = None) -> int:
    """Evaluate as the arguments ask: the win rate, the implicit reward, or both; prints the report."""
    args = build_parser().parse_args(argv)
    decoding = check_args(args)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    policy_path = resolve_run_model(args.model)
    check_model(policy_path)  # a missing model is named before anything else
    if args.reference:
        check_model(args.reference)
    if args.output:
        check_output_file(args.output)  # a path that cannot be written fails now, not after every comparison
    settings = run_settings(policy_path)
    decoding = decoding.for_run(settings)  # the reference is prompted as the policy was trained
    reference_name = args.reference or run_reference_model(settings)
    if not reference_name and not Path(policy_path).is_dir():
        raise EvaluationError(f"--reference is required: {args.model} is not a local model directory, so no "
                              f"{RUN_SETTINGS_FILE} names the model the run started from")
    if not reference_name:
        raise EvaluationError(f"--reference is required: {args.model} has no {RUN_SETTINGS_FILE} naming the "
                              "model the run started from")
    if not args.reference:
        try:
            check_model(reference_name)
        except ModelLoadError as error:
            raise EvaluationError(f"{Path(policy_path) / RUN_SETTINGS_FILE}: its reference_model: {error}; pass "
                                  "--reference MODEL") from None
    device = resolve_device(args.device)
    dtype = resolve_dtype(args.precision, device)
    rows = read_prompt_rows(args) if args.prompts and not args.skip_win_rate else None
    judge = None if args.skip_win_rate else build_judge(args.judge, device=device, dtype=dtype,
                                                        prompts=prompt_records(rows or [], args.prompts, args.judge))
    prompts = (rows if rows is not None else _prompts(args, judge)) if judge is not None else []
    for row in prompts:
        judge.category(row["instruction"])  # a prompt the judge cannot handle fails now, not after generation
    held_out = None
    if args.implicit_reward:  # read and tokenized now: a missing file or split fails before any generation
        dataset = args.dataset or run_dataset(settings)
        if not dataset:
            raise EvaluationError("--implicit-reward needs --dataset (the run's settings name none)")
        tokenizer = load_checked_tokenizer(policy_path)
        if tokenizer.get_vocab() != load_checked_tokenizer(resolve_run_model(reference_name)).get_vocab():
            raise EvaluationError("--implicit-reward needs policy and reference to share a tokenizer")
        held_out = (dataset, *load_eval_pairs(dataset, args.split, tokenizer, settings, args.max_pairs))
    policy = load_model(policy_path, dtype, device)
    reference = load_model(reference_name, dtype, device)
    decoding = decoding.for_tokenizer(policy.tokenizer)  # the run's template, else the policy's chat template if any
    source = "" if args.reference else f" (the run's starting model, from {RUN_SETTINGS_FILE})"
    if judge is not None and decoding.chat_template and not getattr(reference.tokenizer, "chat_template", None):
        raise EvaluationError(f"reference {reference_name}{source}: its tokenizer has no chat template, and the "
                              "prompts are rendered with the chat template; pass --no-chat-template (both models "
                              "prompted with the recipe's '### Human:' template) or another --reference")
    print(f"policy     {policy.path}\nreference  {reference_name}{source}")
    result: dict[str, Any] = {"policy": policy.name, "reference": reference.name}
    comparisons: list = []

    def write_output() -> None:  # after each part, so that a later failure keeps the earlier part's work
        if args.output:
            write_output_text(args.output, json.dumps({"summary": result, "comparisons": [
                asdict(c) for c in comparisons]}, ensure_ascii=False, indent=2) + "\n")

    if judge is not None:
        origin = args.prompts or "held-out"
        print(f"judge      {judge.name}, {len(prompts)} prompts ({origin}), {decoding.describe()}\n")
        comparisons = compare_models(policy, reference, prompts, judge, decoding, batch_size=args.batch_size,
                                     progress=not args.no_progress)
        summary = win_rate_summary(comparisons, policy, reference)
        print(format_win_rate(summary, policy.name, reference.name))
        if checks := format_checks(summary):
            print("\n" + checks)
        if repetition := format_repetition(summary):
            print("\n" + repetition)
        if isinstance(judge, IFEvalJudge):
            texts = [c.instruction for c in comparisons]
            summary["ifeval"] = {
                "policy": ifeval_summary(judge, texts, [c.policy_output for c in comparisons]),
                "reference": ifeval_summary(judge, texts, [c.reference_output for c in comparisons])}
            print("\n" + format_ifeval(summary["ifeval"]["policy"], summary["ifeval"]["reference"], policy.name,
                                       reference.name))
        if args.samples:
            print("\n" + format_samples(comparisons, args.samples, policy.name, reference.name))
        budgets = {"policy": model_prompt_budget(policy.model, decoding),
                   "reference": model_prompt_budget(reference.model, decoding)}  # null: no limit
        result.update(judge=judge.name, decoding=asdict(decoding), prompt_budget=budgets, **summary)
        write_output()

    if held_out is not None:
        dataset, pairs, description, split = held_out
        beta = args.beta or settings.get("beta") or LossSettings().beta
        print(f"\n{description}")
        metrics = implicit_reward_metrics(policy.model, reference.model, pairs, beta=beta,
                                          pad_id=policy.tokenizer.pad_token_id, batch_size=args.batch_size,
                                          ld_alpha=settings.get("ld_alpha"))
        print(format_implicit(metrics))
        result["implicit_reward"] = {**metrics, "dataset": dataset, "split": split}
        write_output()
    print(json.dumps(result, ensure_ascii=False))
    return 0


def cli(argv: list[str] | None = None) -> int:
    """`main` with user errors as one line and exit status 2."""
    return run_cli(main, argv)


if __name__ == "__main__":
    sys.exit(cli())

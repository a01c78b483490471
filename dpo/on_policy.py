"""Online and iterative DPO: the pairs come from the policy's own samples, judged while it trains.

    OnlinePairs     --online: every optimizer step takes its prompts, samples k responses to each from the
                    current policy, scores them with the judge and trains on (best, worst); a prompt whose
                    samples tie is skipped and counted (Guo et al. 2024, "Direct Language Model Alignment from
                    Online AI Feedback"). The reference log-probs of the fresh pairs come from the frozen reference
                    at step time (under LoRA the adapters switched off).
    IterativePairs  --iterations R: each round samples the whole prompt set once with the round's starting
                    policy, judges, and trains an offline round on the (best, worst) pairs with precomputed
                    reference log-probs (Xiong et al. 2024, "Iterative Preference Learning from Human Feedback");
                    --reference-update makes each round's reference its starting policy. A round's pairs and
                    reference log-probs are written to --output-dir/rounds/ before its first step, so a resumed
                    run continues the round where it stopped.

In both, a prompt whose samples tie is skipped and counted, or with --repair-ties trains on the pair (the judge's
repair of a sample, that sample), where the judge can rewrite an answer to score higher (the ifeval judge).

Sampling is a pure function of the policy's weights, the seed and the step (or round): a resumed run samples
what an uninterrupted one would, and sampling never moves the training RNG. Under torchrun each process samples
and judges its slice of the prompts; the pairs are gathered in process order, so every process trains on the
same global batch.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from dpo.batches import PairBatch, process_slice, step_ids
from dpo.data import DataError, TokenizedPair, build_pairs, epoch_permutation
from dpo.ifeval_repair import WORD, sentences
from dpo.prompts import encode_texts, end_of_turn_text, special_ids
from dpo.checkpoint import WRITE_FAILED
from dpo.distributed import DistInfo, barrier, gather
from dpo.errors import first_line
from dpo.files import write_atomically
from dpo.generation import (MIN_TEMPERATURE, TEMPERATURE, TOP_P, DecodingSettings, chat_template_flag,
                            generate_samples, own_rng)
from dpo.judges import JUDGE_HELP, Judge
from dpo.reference import ReferenceLogps
from dpo.settings import ConfigError, at_least, check_settings, non_negative, positive, probability, setting

# raised whenever a release builds other pairs from the same samples (a resumed run names it): 2 trains the ids the
# policy sampled (an answer a stop string ended: the fewest that hold its text), where earlier versions tokenized the
# sampled text again
PAIR_BUILDING = 2
SEED_STRIDE = 1_000_003  # sampling seeds: ((seed * SEED_STRIDE + step or round) * GROUP_STRIDE + group) mod 2^63
GROUP_STRIDE = 65_537
SAMPLE_GROUP = 16  # prompts per generate call, each group with its own seed: the samples of a prompt do not depend
#                    on how the prompts are split over processes or micro-batches


# OnPolicySettings' switches; its other settings say how answers are sampled and judged, read only when one is on
SWITCHES = ("online", "iterations", "reference_update")


@dataclass
class OnPolicySettings:
    """Online and iterative DPO (pairs sampled from the policy and judged): which one, the judge, and how responses
    are sampled. Flat on the command line (`--online`, `--iterations`, `--num-samples`, `--judge`, ...)."""

    online: bool = setting(False, "online DPO: each step samples --num-samples responses per prompt from the current "
                                  "policy, the judge picks (best, worst)")
    iterations: int = setting(0, "iterative DPO in R rounds: each round samples every prompt once with its starting "
                                 "policy, then trains offline on the judged pairs (0: off)", check=non_negative)
    reference_update: bool = setting(False, "iterative DPO: each round's reference is its starting policy (else the "
                                            "SFT model throughout)")
    num_samples: int = setting(4, "responses sampled per prompt (online and iterative DPO)", check=at_least(2))
    judge: str = setting("demo", f"judge of the samples: {JUDGE_HELP}")
    sample_temperature: float = setting(TEMPERATURE, "sampling temperature of online / iterative DPO",
                                        check=at_least(MIN_TEMPERATURE))
    sample_top_p: float = setting(TOP_P, "sampling top-p of online / iterative DPO", check=probability)
    sample_max_new_tokens: int = setting(64, "new tokens per sampled response", check=positive)
    repair_ties: bool = setting(False, "a prompt whose samples all score alike trains on (the judge's repair of a "
                                       "sample, that sample) instead of being skipped (judges that repair: ifeval)")
    pair_choice: str = setting("first", "which of the answers the judge scores alike make a pair: first (in sampling "
                                        "order), longest (the longest best, the shortest worst; a tie repairs its "
                                        "longest answer), matched (the best and worst closest in length); the last "
                                        "two counter a drift to short answers", choices=("first", "longest", "matched"))
    missing_eos_penalty: float = setting(0.0, "subtracted from the judge's score of a sample that ran out of "
                                              "--sample-max-new-tokens before its EOS, before the pair is chosen "
                                              "(TRL's name): the policy learns to end its answers", check=non_negative)

    def __post_init__(self) -> None:
        check_settings(self)
        if self.online and self.iterations:
            raise ConfigError("--online and --iterations exclude each other: one samples every step, the other "
                              "once per round")
        if self.reference_update and not self.iterations:
            raise ConfigError("--reference-update needs --iterations (a round's reference is its starting policy)")
        if not self.enabled and (given := self.sampling_settings_given()):
            raise ConfigError(f"{', '.join(given)} {'changes' if len(given) == 1 else 'change'} nothing without "
                              "--online or --iterations (they say how the policy's answers are sampled and judged)")

    def sampling_settings_given(self) -> list[str]:
        """'--flag value' of each setting of how answers are sampled and judged that differs from its default."""
        return [f"--{f.name.replace('_', '-')} {getattr(self, f.name)}" for f in fields(self)
                if f.name not in SWITCHES and getattr(self, f.name) != f.default]

    @property
    def enabled(self) -> bool:
        """Whether the run trains on sampled pairs (online or iterative DPO) instead of the preference set."""
        return self.online or self.iterations > 0


def first_pair(lengths: list[int], best: list[int], worst: list[int]) -> tuple[int, int]:
    """--pair-choice first: the first of the best and the first of the worst, in sampling order."""
    return best[0], worst[0]


def longest_pair(lengths: list[int], best: list[int], worst: list[int]) -> tuple[int, int]:
    """--pair-choice longest: the longest of the best and the shortest of the worst (sampling order among equals)."""
    return min(best, key=lambda i: -lengths[i]), min(worst, key=lambda i: lengths[i])


def matched_pair(lengths: list[int], best: list[int], worst: list[int]) -> tuple[int, int]:
    """--pair-choice matched: the (best, worst) pair whose lengths differ least, so that the pair teaches what the
    judge scores and as little as it can about length (the first such pair in sampling order)."""
    return min(((b, w) for b in best for w in worst), key=lambda bw: abs(lengths[bw[0]] - lengths[bw[1]]))


PAIR_CHOICES: dict[str, Callable[[list[int], list[int], list[int]], tuple[int, int]]] = {
    "first": first_pair, "longest": longest_pair, "matched": matched_pair}


@dataclass
class Sampler:
    """Samples k responses per prompt from a model, scores them with the judge, and tokenizes (best, worst) pairs
    as the offline data path does (dpo.data.build_pairs with the run's template and lengths)."""

    settings: OnPolicySettings
    judge: Judge
    tokenizer: Any
    lengths: dict[str, Any]  # max_length, max_prompt_length, truncation_mode, template
    seed: int
    precision: str = "fp32"  # the run's (resolved): the policy samples under its autocast

    def __post_init__(self) -> None:
        if self.settings.repair_ties and not getattr(self.judge, "can_repair", False):
            raise ConfigError(f"--repair-ties needs a judge that can repair an answer (ifeval); judge "
                              f"{self.judge.name} cannot")

    def decoding(self, position: int, group: int = 0) -> DecodingSettings:
        """How the responses of step (or round) `position`, prompt group `group`, are sampled: the sampling settings
        with a seed of their own, and the run's prompt rendering and truncation."""
        s = self.settings
        seed = ((self.seed * SEED_STRIDE + position) * GROUP_STRIDE + group) % 2 ** 63
        return DecodingSettings(temperature=s.sample_temperature, top_p=s.sample_top_p,
                              max_new_tokens=s.sample_max_new_tokens, seed=seed,
                              chat_template=chat_template_flag(self.lengths["template"]),
                              max_prompt_length=self.lengths["max_prompt_length"],
                              truncation_mode=self.lengths["truncation_mode"])

    def sample(self, model: torch.nn.Module, prompts: list[str], position: int,
               group: int = 0) -> tuple[list[list[str]], list[list[bool]], list[list[list[int] | None]]]:
        """k responses to each prompt in one generate call, whether each was cut at --sample-max-new-tokens, and the
        ids each was sampled as (dpo.generation.Sample.ids): a pure function of the model, the prompts, `position`
        (the step, or the round) and `group`; the training RNG is left as it was."""
        k = self.settings.num_samples
        with own_rng(model):
            flat = generate_samples(model, self.tokenizer, prompts, self.decoding(position, group),
                                    batch_size=len(prompts), num_samples=k, warn=False, precision=self.precision)
        groups = [flat[i * k:(i + 1) * k] for i in range(len(prompts))]
        return ([[s.text for s in g] for g in groups], [[not s.ended for s in g] for g in groups],
                [[s.ids for s in g] for g in groups])

    def sample_pairs(self, model: torch.nn.Module, prompts: list[str], ids: list[int], position: int,
                     dist: DistInfo) -> tuple[list[TokenizedPair], dict[str, float]]:
        """The (best, worst) pairs of prompts[ids] (in that order) and the sampling metrics, the same on every
        process: the ids are cut into groups of SAMPLE_GROUP, each process samples and judges its share of the
        groups, and the pairs are gathered in group order."""
        start = time.perf_counter()
        groups = [ids[i:i + SAMPLE_GROUP] for i in range(0, len(ids), SAMPLE_GROUP)]
        pairs: list[TokenizedPair] = []
        stats: list[dict[str, float]] = []
        for g in process_slice(len(groups), dist.rank, dist.world_size):
            texts = [prompts[i] for i in groups[g]]
            responses, cut, sampled = self.sample(model, texts, position, g)
            group_pairs, group_stats = self.pairs(texts, responses, groups[g], cut, sampled)
            pairs += group_pairs
            stats.append(group_stats)
        return gather(pairs, dist), summarize(gather(stats, dist), time.perf_counter() - start)

    def pairs(self, prompts: list[str], responses: list[list[str]], rows: list[int],
              cut: list[list[bool]] | None = None, sampled: list[list[list[int] | None]] | None = None,
              ) -> tuple[list[TokenizedPair], dict[str, float]]:
        """(best, worst) pairs by the judge's scores and the statistics: sums of scores, tokens and counts, to be
        added over processes. A prompt whose best and worst tie is skipped, or with --repair-ties trains on the
        judge's repair of a sample against that sample. `cut`: which samples ran out of new tokens; as a response
        cut by --max-length, such a sample keeps no EOS (the policy is not taught to stop where it did not), nor
        does a repair of it that ends as it does (`keeps_end`: lower-cased, say, not a postscript appended). With
        --missing-eos-penalty P the best and worst are chosen by the judge's score minus P for a cut sample.
        `sampled`: the ids each sample was sampled as (None where unknown): a response is trained as those ids, not
        as its text tokenized again (a model samples splits its tokenizer would not write: "\n\n" as one token where
        the tokenizer writes two); a repair is tokenized from its text."""
        judged = self.judge.score_batch(prompts, responses)
        cut = cut or [[False] * len(answers) for answers in responses]
        sampled = sampled or [[None] * len(answers) for answers in responses]
        penalty = self.settings.missing_eos_penalty
        # rounded: 5/6 - 0.5 and 1/3 (IFEval's scores of three constraints) tie, not by a rounding error
        scores = [[round(x - penalty * c, SCORE_DECIMALS) for x, c in zip(row, row_cut)]
                  for row, row_cut in zip(judged, cut)]
        records, kept_rows, ends, as_sampled, repairs, ties = [], [], [], [], set(), 0
        for prompt, answers, row_scores, row, row_cut, row_judged, row_ids in zip(prompts, responses, scores, rows, cut,
                                                                                 judged, sampled):
            top, bottom = max(row_scores), min(row_scores)
            if top != bottom:
                best, worst = self.choose(answers, [i for i, x in enumerate(row_scores) if x == top],
                                          [i for i, x in enumerate(row_scores) if x == bottom])
                records.append({"prompt": prompt, "chosen": answers[best], "rejected": answers[worst]})
                kept_rows.append(row)
                ends.append((row_cut[best], row_cut[worst]))
                as_sampled.append((row_ids[best], row_ids[worst]))
                continue
            ties += 1
            order = self.repair_order(answers)
            fixed = (self.repaired(prompt, [answers[i] for i in order], [row_judged[i] for i in order])
                     if self.settings.repair_ties else None)
            if fixed is not None:
                source = order[fixed.pop("index")]  # a repair keeping a cut sample's end is cut as well
                ends.append((row_cut[source] and keeps_end(answers[source], fixed["chosen"]), row_cut[source]))
                as_sampled.append((None, row_ids[source]))
                repairs.add(len(records))
                records.append({"prompt": prompt, **fixed})
                kept_rows.append(row)
        built, _ = build_pairs(records, self.tokenizer, source="online samples", allow_empty=True, samples=True,
                               **self.lengths)
        end = self.end_ids
        pairs, repaired = [], 0
        for p in built:
            (chosen_cut, rejected_cut), (chosen_ids, rejected_ids) = ends[p.row], as_sampled[p.row]
            chosen = self.response(p.chosen_ids, chosen_cut, chosen_ids, len(p.prompt_ids))
            rejected = self.response(p.rejected_ids, rejected_cut, rejected_ids, len(p.prompt_ids))
            # the same text cut and ended differs by its end; the same tokens, or an answer of none, teach nothing
            if chosen != rejected and chosen and rejected:
                pairs.append(TokenizedPair(p.prompt_ids, chosen, rejected, kept_rows[p.row]))
                repaired += p.row in repairs  # trained on a repair: one lost when tokenized counts as unusable
        lengths = [len(ids) if ids is not None else len(self.tokenizer(a, add_special_tokens=False)["input_ids"])
                   for answers, row_ids in zip(responses, sampled) for a, ids in zip(answers, row_ids)]
        stats = {"score_sum": sum(sum(row) for row in judged), "samples": sum(len(r) for r in responses),
                 "tokens": sum(lengths), "prompts": len(prompts), "ties": ties,
                 "repaired": repaired, "unusable": len(records) - len(pairs), "pairs": len(pairs),
                 "cut": sum(sum(row) for row in cut),
                 "chosen_tokens": sum(len(_without_end(p.chosen_ids, end)) for p in pairs),
                 "rejected_tokens": sum(len(_without_end(p.rejected_ids, end)) for p in pairs)}
        return pairs, stats

    def response(self, tokenized: list[int], cut: bool, sampled: list[int] | None, prompt_length: int) -> list[int]:
        """A response's trained ids: as sampled where known, else `tokenized` from its text (build_pairs'); with the
        response end (end_ids) unless it was cut; within --max-length (a response cut there loses its end)."""
        if sampled is None:
            return _without_end(tokenized, self.end_ids) if cut else tokenized
        ids = sampled if cut else sampled + self.end_ids
        return ids[:self.lengths["max_length"] - prompt_length]

    @functools.cached_property
    def end_ids(self) -> list[int]:
        """The ids that end every response: the template's end-of-turn text (Phi-3's `<|end|>`; none for the recipe
        template, whose end is the EOS) and the EOS. A cut sample loses them all: its turn did not end either."""
        template, eos = self.lengths["template"], special_ids(self.tokenizer).eos
        text = end_of_turn_text(template, self.tokenizer)
        ids = encode_texts(self.tokenizer, [text], template)[0] if text else []
        return ids if ids[-1:] == [eos] else ids + [eos]

    def choose(self, answers: list[str], best: list[int], worst: list[int]) -> tuple[int, int]:
        """(chosen, rejected): the indices --pair-choice takes from the best and the worst answers (each list in
        sampling order); lengths are counted in characters."""
        return PAIR_CHOICES[self.settings.pair_choice]([len(a) for a in answers], best, worst)

    def repair_order(self, answers: list[str]) -> list[int]:
        """The order in which a tie's answers are offered to the judge's repair: the chosen's order of
        --pair-choice, that is the longest first for `longest`, else sampling order."""
        everyone = list(range(len(answers)))
        if self.settings.pair_choice != "longest":
            return everyone
        return sorted(everyone, key=lambda i: -len(answers[i]))

    def repaired(self, prompt: str, answers: list[str], scores: list[float]) -> dict[str, Any] | None:
        """(chosen, rejected) = (the judge's repair, the answer) and the answer's index, for the first answer, in the
        order given, that the judge repairs into one it scores above the answer's own score (`scores`, the judge's);
        None when it repairs none."""
        for index, (answer, score) in enumerate(zip(answers, scores)):
            fixed = self.judge.repair(prompt, answer)
            if fixed is not None and fixed != answer and self.judge.score_batch([prompt], [[fixed]])[0][0] > score:
                return {"chosen": fixed, "rejected": answer, "index": index}
        return None


SCORE_DECIMALS = 9  # penalized scores are compared to this many decimals


def keeps_end(sample: str, repair: str) -> bool:
    """Whether `repair` ends as `sample` does: the whole sample, list markers, case, commas and white space ignored,
    is how the repair ends. A repair lower-cased, without commas, with a title put before it or cut into bullets
    keeps a cut sample's end; one with an end phrase, a postscript or a closing quotation mark appended, or with
    fewer sentences, ends anew (also where what it appends repeats the sample's last words)."""
    whole = _content(sample)
    return bool(whole) and _content(repair).endswith(whole)


def _content(text: str) -> str:
    # the sentences and lines with a word, as a bullet repair keeps them (a "---" rule inside is dropped), and the
    # last one whatever it holds: a closing quotation mark on a line of its own is an end the repair wrote
    parts = sentences(text)
    kept = "".join(part for i, part in enumerate(parts) if WORD.search(part) or i == len(parts) - 1)
    return re.sub(r"[\s,]+", "", kept.casefold())


def _without_end(ids: list[int], end: list[int]) -> list[int]:
    """`ids` without the response end `end` (end-of-turn ids, then the EOS), or without the EOS alone where the
    end-of-turn ids were tokenized otherwise in context."""
    if len(end) > 1 and ids[-len(end):] == end:
        return ids[:-len(end)]
    return ids[:-1] if ids[-1:] == end[-1:] else ids


def summarize(stats: list[dict[str, float]], seconds: float) -> dict[str, float]:
    """The logged sampling metrics from the processes' statistics."""
    keys = ("score_sum", "samples", "tokens", "prompts", "ties", "repaired", "unusable", "pairs", "cut",
            "chosen_tokens", "rejected_tokens")
    total = {key: sum(s[key] for s in stats) for key in keys}
    samples, prompts, pairs = max(total["samples"], 1), max(total["prompts"], 1), total["pairs"]
    lengths = {"online/chosen_length": total["chosen_tokens"] / pairs,
               "online/rejected_length": total["rejected_tokens"] / pairs} if pairs else {}  # no pair: no length
    return {"online/score": total["score_sum"] / samples, "online/ties": total["ties"] / prompts,
            "online/repaired": total["repaired"] / prompts,
            "online/unusable": total["unusable"] / prompts, "online/pairs": pairs,
            "online/mean_length": total["tokens"] / samples, "online/cut": total["cut"] / samples, **lengths,
            "online/sample_s": seconds}


@dataclass
class SampledPairs:
    """What online and iterative DPO's pair sources share: prompts to sample, `batch_size` per step, and no pair of
    the preference set to precompute reference log-probs for."""

    prompts: list[str]
    batch_size: int
    seed: int
    sampler: Sampler

    @property
    def steps_per_epoch(self) -> int:
        """Batches in one pass over the prompts (a round of iterative DPO has at most one pair per prompt)."""
        return len(self.prompts) // self.batch_size

    def used_ids(self, total_steps: int) -> list[int]:
        """None: the pairs are sampled during the run, their reference log-probs computed then."""
        return []


@dataclass
class OnlinePairs(SampledPairs):
    """--online: the pair source whose step s samples the prompts of step s from the current policy (batch_size:
    prompts per optimizer step)."""

    def step_batch(self, step: int, reference: Any, policy: torch.nn.Module, dist: DistInfo) -> PairBatch:
        """Step `step`'s prompts sampled from `policy` and judged into (best, worst) pairs, the same on every
        process; their reference log-probs come at step time."""
        ids = step_ids(len(self.prompts), self.batch_size, self.seed, step)
        pairs, metrics = self.sampler.sample_pairs(policy, self.prompts, ids, step, dist)
        return PairBatch(pairs, None, metrics)


RoundReference = Callable[[list[TokenizedPair], int], "ReferenceLogps | None"]


@dataclass
class IterativePairs(SampledPairs):
    """--iterations R: round r covers steps [r x steps_per_round, (r + 1) x steps_per_round); its pairs are sampled
    once, at its first step, from every prompt, and its steps take batches of them like OfflinePairs (batch_size:
    pairs per optimizer step)."""

    rounds: int
    round_dir: Path
    total_steps: int  # the run's length, cut into `rounds` rounds
    identity: str  # the run's settings: a round file written by a run with others is refused
    # (pairs, round) -> the round's reference log-probs of `pairs`, computed before the round's first update
    reference: RoundReference
    _round: int = field(default=-1, init=False)
    _pairs: list[TokenizedPair] = field(default_factory=list, init=False)
    _reference: ReferenceLogps | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if self.total_steps < self.rounds:
            raise ConfigError(f"--iterations {self.rounds} needs at least one step per round; the run has "
                              f"{self.total_steps} (--max-steps / --epochs)")

    @property
    def steps_per_round(self) -> int:
        """Optimizer steps of each round (the last round also takes the remainder)."""
        return max(1, self.total_steps // self.rounds)

    def round_of(self, step: int) -> int:
        """The 0-based round that optimizer step `step` belongs to."""
        return min(step // self.steps_per_round, self.rounds - 1)

    def step_batch(self, step: int, reference: Any, policy: torch.nn.Module, dist: DistInfo) -> PairBatch:
        """Step `step`'s batch of its round's pairs (sampled, judged and given reference log-probs at the round's
        first step, or read back from rounds/ on resume)."""
        r = self.round_of(step)
        first = r * self.steps_per_round
        metrics = {}
        if r != self._round:
            metrics = self._start_round(r, policy, dist, resumed_inside=step != first)
            if step != first:  # resumed inside the round: its sampling was logged at its first step
                metrics = {}
        # one pass over the round's pairs in a seeded order, each pair trained on once; when the pass ends before
        # the round does (ties left few pairs: little is left to learn), its remaining steps have nothing to train on
        order = epoch_permutation(len(self._pairs), 0, self.seed + r)
        ids = order[(step - first) * self.batch_size:(step - first + 1) * self.batch_size]
        if not ids:
            return PairBatch([], None, {**metrics, "online/round": r + 1})
        reference = self._reference.select(ids) if self._reference is not None else None
        return PairBatch([self._pairs[i] for i in ids], reference, {**metrics, "online/round": r + 1})

    def _start_round(self, r: int, policy: torch.nn.Module, dist: DistInfo, resumed_inside: bool) -> dict[str, float]:
        """The round's pairs and reference log-probs: read from rounds/round-<r>.pt, or sampled, judged and
        computed now, before the round's first update (the main process writes the file)."""
        path = self.round_dir / f"round-{r + 1}.pt"
        metrics: dict[str, float] = {}
        if not path.is_file():
            if resumed_inside:  # the policy has moved since the round began: its samples cannot be made again
                raise DataError(f"--resume inside round {r + 1}, but {path} is missing: the round's samples cannot "
                                "be recreated from a policy that has trained since; --overwrite to start afresh")
            pairs, metrics = self.sampler.sample_pairs(policy, self.prompts, list(range(len(self.prompts))), r, dist)
            if dist.is_main:
                reference = self.reference(pairs, r)
                payload = {"pairs": [[p.prompt_ids, p.chosen_ids, p.rejected_ids, p.row] for p in pairs],
                           "metrics": metrics, "identity": self.identity}
                if reference is not None:
                    reference.require_finite(f"round {r + 1}")
                    payload.update(chosen=reference.chosen, rejected=reference.rejected)
                try:
                    write_atomically(path, lambda handle: torch.save(payload, handle))
                except (OSError, RuntimeError) as error:
                    if not isinstance(error, OSError) and not WRITE_FAILED.search(str(error)):
                        raise
                    raise DataError(f"{path} cannot be written ({first_line(error)})") from None
            barrier(dist)
        try:
            data = torch.load(path, weights_only=True)
        except Exception as error:  # cut short or foreign: torch, zip and pickle raise many types
            raise DataError(f"{path} cannot be read ({first_line(error)}); --overwrite to start afresh") from None
        if data.get("identity") != self.identity:
            raise DataError(f"{path} was sampled by a run with other settings; use them, or --overwrite to start "
                            "afresh")
        self._pairs = [TokenizedPair(*row) for row in data["pairs"]]
        self._reference = ReferenceLogps(data["chosen"], data["rejected"]) if "chosen" in data else None
        self._round = r
        return data["metrics"] if not metrics else metrics

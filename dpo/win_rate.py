"""Win rate against the reference while training (--eval-generate N).

At every evaluation the policy answers N held-out prompts with the card's decoding (temperature 0.7, top-p 0.9,
seeded with --seed, the same prompts and seed each time), and a judge of dpo.judges (the demo judge, a reward
model, a DPO model's implicit reward) compares each answer with the reference's answer to the same prompt, as
`python -m dpo.evaluate` does on a final model: win rate with its Wilson 95% interval, mean answer lengths, the
judge's mean scores, and a few samples. The reference answers are generated once, before the first update (when
the policy is the reference; under LoRA, the adapters switched off), and kept in --output-dir/eval_generate/ so
a resumed run compares against the same answers.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from dpo.files import write_text_atomically
from dpo.evaluate import WinRate, draw_prompt_rows, mean_lengths
from dpo.generation import TEMPERATURE, TOP_P, DecodingSettings, chat_template_flag, generate_batch, own_rng
from dpo.judges import Judge, JudgeError, build_judge, prompt_records
from dpo.precision import frozen_dtype, resolve_precision

SAMPLES_SHOWN = 4  # rows of the samples table logged at each evaluation
SAMPLE_COLUMNS = ["instruction", "reference", "policy", "outcome"]
OUTCOME_NAMES = {1.0: "policy wins", 0.5: "tie", 0.0: "reference wins"}


@dataclass
class WinRateEval:
    """The win rate against the reference at each evaluation: the judge, the prompts, the decoding and
    the cache of the reference's answers."""

    judge: Judge
    prompts: list[str]
    decoding: DecodingSettings
    tokenizer: Any
    batch_size: int
    cache_dir: Path
    precision: str = "fp32"  # the run's (resolved): policy and reference sample under its autocast
    reference_outputs: list[str] | None = None
    reference_score: float | None = None  # the judge's mean score of the reference's answers, where it scores
    reference_scored: bool = False  # whether reference_score was computed (None: the judge only compares)

    @classmethod
    def build(cls, cfg: Any, tokenizer: Any, device: torch.device) -> "WinRateEval":
        """The judge, the N prompts (--eval-prompts, else the judge's own held-out prompts) and the decoding."""
        precision = resolve_precision(cfg.precision, device)
        # drawn as `python -m dpo.evaluate --prompts FILE --num-prompts N --seed S` draws them
        rows = draw_prompt_rows(cfg.eval_prompts, cfg.eval_generate, cfg.seed, "--eval-generate") \
            if cfg.eval_prompts else []
        judge = build_judge(cfg.eval_judge, device=device, dtype=frozen_dtype(precision),
                            prompts=prompt_records(rows, cfg.eval_prompts, cfg.eval_judge))
        n = cfg.eval_generate
        if cfg.eval_prompts:
            prompts = [row["instruction"] for row in rows]
        else:
            try:
                prompts = judge.default_prompts(n, cfg.seed)
            except JudgeError as error:
                raise JudgeError(f"--eval-generate {n}: {error}") from None
            if prompts is None:
                raise JudgeError(f"--eval-judge {cfg.eval_judge} has no prompts of its own: give --eval-prompts FILE")
        for text in prompts:
            judge.category(text)  # a prompt the judge cannot handle fails now, not at the first evaluation
        decoding = DecodingSettings(temperature=TEMPERATURE, top_p=TOP_P, max_new_tokens=cfg.eval_max_new_tokens,
                                  seed=cfg.seed, chat_template=chat_template_flag(cfg.template),
                                  max_prompt_length=cfg.max_prompt_length, truncation_mode=cfg.truncation_mode)
        return cls(judge, list(prompts), decoding, tokenizer, cfg.eval_generate_batch_size,
                   Path(cfg.output_dir) / "eval_generate", precision)

    def _generate(self, model: torch.nn.Module) -> list[str]:
        # sampling must not move the training RNG: a run with --eval-generate trains exactly as one without
        with own_rng(model):
            return generate_batch(model, self.tokenizer, self.prompts, self.decoding, batch_size=self.batch_size,
                                  precision=self.precision)

    def reference_file(self, model_key: str) -> Path:
        """The cache file of the reference's answers for this model, prompts, decoding and precision."""
        key = {"model": model_key, "prompts": self.prompts, "decoding": repr(self.decoding)}
        if self.precision != "fp32":  # (fp32 keys stay those of the caches written before precision was keyed)
            key["precision"] = self.precision
        digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:16]
        return self.cache_dir / f"reference-{digest}.json"

    def _cached_outputs(self, path: Path) -> list[str] | None:
        """The reference's answers cached at `path`, or None where there are none or the file is not a whole cache
        of these prompts (damaged: they are generated again and the file replaced)."""
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):  # missing, cut short, not UTF-8
            return None
        outputs = data.get("outputs") if isinstance(data, dict) else None
        if (not isinstance(outputs, list) or len(outputs) != len(self.prompts)
                or not all(isinstance(output, str) for output in outputs)):
            return None
        return outputs

    def prepare_reference(self, model_key: str, reference: Any) -> bool:
        """The reference's answers: read from the cache, or generated by `reference()` -> (model, context).
        Returns whether they were generated now."""
        path = self.reference_file(model_key)
        cached = self._cached_outputs(path)
        if cached is not None:
            self.reference_outputs = cached
        else:
            model, mode = reference()
            with mode():
                self.reference_outputs = self._generate(model)
            write_text_atomically(path, json.dumps({"prompts": self.prompts, "outputs": self.reference_outputs},
                                                   ensure_ascii=False))
        self._judge_reference()
        return cached is None

    def _judge_reference(self) -> None:
        """The judge's first work, before the run's first step: it scores the reference's answers (kept for every
        evaluation) and compares one with itself. A judge that fails (a server down, scores that are not numbers)
        stops the run before it trains, not at its first evaluation, with every step since lost."""
        self.reference_mean_score()
        self.judge.compare(self.prompts[0], self.reference_outputs[0], self.reference_outputs[0])

    def reference_mean_score(self) -> float | None:
        """The judge's mean score of the reference's answers (computed once), or None for a judge that only
        compares."""
        if not self.reference_scored:
            scores = [self.judge.score(p, o) for p, o in zip(self.prompts, self.reference_outputs)]
            if all(s is not None for s in scores):
                self.reference_score = sum(scores) / len(scores)
            self.reference_scored = True
        return self.reference_score

    def run(self, policy: torch.nn.Module) -> tuple[dict[str, float], list[list[Any]]]:
        """The policy's answers judged against the reference's: (metrics named generate/..., sample rows)."""
        if self.reference_outputs is None:
            raise RuntimeError("prepare_reference must run before the first evaluation")
        start = time.perf_counter()
        outputs = self._generate(policy)
        outcomes = [self.judge.compare(p, mine, theirs)
                    for p, mine, theirs in zip(self.prompts, outputs, self.reference_outputs)]
        rate = WinRate.from_outcomes(outcomes)
        low, high = rate.interval
        metrics = {"generate/win_rate": rate.win_rate, "generate/win_rate_low": low, "generate/win_rate_high": high,
                   "generate/ties": rate.ties / rate.n,
                   "generate/mean_length": mean_lengths(outputs, self.tokenizer)["tokens"],
                   "generate/reference_mean_length": mean_lengths(self.reference_outputs, self.tokenizer)["tokens"]}
        scores = [self.judge.score(p, o) for p, o in zip(self.prompts, outputs)]
        if all(s is not None for s in scores) and self.reference_mean_score() is not None:
            metrics["generate/score"] = sum(scores) / len(scores)
            metrics["generate/reference_score"] = self.reference_score
        metrics["generate/seconds"] = time.perf_counter() - start
        rows = [[p, theirs, mine, OUTCOME_NAMES[o]] for p, theirs, mine, o in
                list(zip(self.prompts, self.reference_outputs, outputs, outcomes))[:SAMPLES_SHOWN]]
        return metrics, rows

"""Pairwise judges: which of two answers to an instruction is better.

A judge is anything with

    compare(instruction, answer_a, answer_b) -> float   1.0: a is better, 0.0: b is better, 0.5: a tie
    category(instruction) -> str | None                  optional, for per-category tables
    checks(instruction, answer) -> dict[str, bool] | None optional, yes/no properties (the demo's: correct, concise)
    score(instruction, answer) -> float | None           optional, an absolute score of one answer

and, optionally, `default_prompts(n, seed)`: the held-out instructions it knows how to judge.

    DemoJudge         the embedded demo's programmatic judge (dpo.demo.task): correct beats wrong, and
                      among correct answers concise beats rambling
    RewardModelJudge  any Hugging Face AutoModelForSequenceClassification reward model with one output:
                      the answer with the higher reward wins, equal rewards tie
    ImplicitRewardJudge  a trained DPO model's implicit reward, beta (log pi(y|x) - log ref(y|x)) with the
                      run's beta, reference, template and lengths (its final/dpo_run.json): 'implicit:RUN/final'
    IFEvalJudge       'ifeval': IFEval's own checkers (dpo.ifeval) on prompts that carry IFEval's fields
                      (prompt, instruction_id_list, kwargs); a response scores the mean of its constraints'
                      verdicts (1 strict, 0.5 loose only), its checks are IFEval's prompt-level strict and loose
    IFEvalNoEchoJudge 'ifeval-no-echo': the same, but an answer that copies a constraint of its prompt scores 0
    IFEvalNoEchoNoLoopJudge 'ifeval-no-echo-no-loop': the same, and an answer that loops (dpo.repetition) scores 0
    FunctionJudge     a user's function, 'pkg.module:function' or 'file.py:function' (dpo.plugins), called as
                      fn(prompts: list[str], responses: list[list[str]]) -> list[list[float]]: a score for each
                      response to each prompt, higher is better

`score_batch(prompts, responses)` scores many candidates at once (online DPO's k samples per prompt); every judge
has it, checked: one finite number per response, or a JudgeError naming the judge.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from dpo.data import PreferenceExample, collate_pairs, constraint_clash, other_constraints, tokenize_pair
from dpo.errors import UserError, first_line
from dpo.generation import load_checked_tokenizer, resolve_run_model, run_reference_model, run_settings
from dpo.ifeval import IFEvalError, IFEvalPrompt, echoed_constraint, parse_prompt, verdicts
from dpo.ifeval_repair import repair
from dpo.logprobs import sequence_logps
from dpo.modeling import ModelLoadError, load_causal_lm, require_tokenizer_files, resolve_model_path
from dpo.plugins import is_function_spec, load_function
from dpo.prompts import as_messages, format_response, read_prompt, render_prompt, render_response
from dpo.repetition import repeats_itself


CACHE_LIMIT = 65_536  # scores a judge keeps (compare() and score() ask for the same ones); cleared when full
REWARD_BATCH = 32  # texts per forward of a reward model scoring a batch


class JudgeError(UserError):
    """A judge that cannot be built, or an instruction it cannot judge."""


class Judge:
    """The judge interface; subclasses implement `compare`."""

    name = "judge"

    def compare(self, instruction: str, answer_a: str, answer_b: str) -> float:
        """1.0 when answer a is the better one, 0.0 when b is, 0.5 for a tie."""
        raise NotImplementedError

    def score(self, instruction: str, answer: str) -> float | None:
        """An absolute score of one answer, where the judge has one (reported as a per-model mean)."""
        return None

    def category(self, instruction: str) -> str | None:
        """The instruction's category, for per-category tables; None when the judge has none."""
        return None

    def checks(self, instruction: str, answer: str) -> dict[str, bool] | None:
        """Named yes/no properties of an answer where the judge can tell (the demo's: correct, concise)."""
        return None

    def default_prompts(self, n: int | None, seed: int) -> list[str] | None:
        """Instructions to evaluate on when none are given; None when the judge has no own prompts."""
        return None

    can_repair = False  # whether `repair` can rewrite an answer (online and iterative DPO's --repair-ties)

    def repair(self, instruction: str, answer: str) -> str | None:
        """The answer rewritten so that the judge scores it higher, where the judge knows how; else None."""
        return None

    def score_batch(self, prompts: list[str], responses: list[list[str]]) -> list[list[float]]:
        """A score for each response to each prompt (higher is better), checked: finite numbers, one per response."""
        try:
            scores = self._score_batch(prompts, responses)
        except JudgeError:
            raise
        except Exception as error:  # a user's judge may raise anything: name it in one line
            raise JudgeError(f"judge {self.name} raised {type(error).__name__}: {first_line(error)}") from None
        return check_scores(self.name, scores, prompts, responses)

    def _score_batch(self, prompts: list[str], responses: list[list[str]]) -> list[list[float]]:
        scores = [[self.score(prompt, answer) for answer in answers] for prompt, answers in zip(prompts, responses)]
        if any(score is None for row in scores for score in row):
            raise JudgeError(f"judge {self.name} gives no absolute scores; online DPO needs a judge that scores")
        return scores


def check_scores(name: str, scores: Any, prompts: list[str], responses: list[list[str]]) -> list[list[float]]:
    """`scores` as a list of rows of floats shaped like `responses` (those to `prompts`), else a one-line JudgeError
    naming the prompt."""
    try:
        rows = [list(row) for row in scores]
    except TypeError:
        raise JudgeError(f"judge {name} returned {type(scores).__name__}, not a list of score lists") from None
    if len(rows) != len(responses):
        raise JudgeError(f"judge {name} returned {len(rows)} score lists for {len(responses)} prompts")
    checked = []
    for prompt, row, answers in zip(prompts, rows, responses):
        where = f"judge {name}: the scores of the responses to {_named(prompt)}"
        if len(row) != len(answers):
            raise JudgeError(f"{where} are {len(row)} for {len(answers)} responses")
        try:
            values = [float(v) for v in row]
        except (TypeError, ValueError):
            raise JudgeError(f"{where} are not numbers ({row!r:.80})") from None
        if not all(math.isfinite(v) for v in values):
            raise JudgeError(f"{where} are not all finite ({values})")
        checked.append(values)
    return checked


def finite_reward(name: str, instruction: str, value: float) -> float:
    """`value`, a model's reward of an answer to `instruction`; a one-line JudgeError when it is NaN or infinite
    (it would count as a tie, and reach --output as NaN)."""
    if not math.isfinite(value):
        raise JudgeError(f"judge {name}: the reward of an answer to {_named(instruction)} is {value}, not finite")
    return value


def _named(prompt: str) -> str:
    return f"{prompt[:60]!r}{'...' if len(prompt) > 60 else ''}"


def _outcome(score_a: float, score_b: float) -> float:
    return 1.0 if score_a > score_b else 0.0 if score_a < score_b else 0.5


class DemoJudge(Judge):
    """dpo.demo.task's judge: score 1.0 correct and concise, 0.5 correct only, 0.0 wrong; higher wins.

    Instructions are given as text and mapped back to the demo's Instruction objects (train and test
    splits); text that is not a demo instruction is an error.
    """

    name = "demo"

    @cached_property
    def _task(self) -> Any:
        # imported when a demo judge is first used, not with dpo.judges: the demo's task loads only when asked for
        from dpo.demo import task

        return task

    @cached_property
    def _by_text(self) -> dict[str, Any]:
        return {instr.text: instr for split in self._task.SPLITS for instr in self._task.instructions(split)}

    def instruction(self, text: str) -> Any:
        """The demo's Instruction whose text this is; a JudgeError for text that is not a demo instruction."""
        try:
            return self._by_text[text.strip()]
        except KeyError:
            raise JudgeError(f"the demo judge only knows the demo's instructions, not {text[:80]!r}") from None

    def score(self, instruction: str, answer: str) -> float:
        """1.0 correct and concise, 0.5 correct only, 0.0 wrong."""
        return self._task.judge(self.instruction(instruction), answer).score

    def compare(self, instruction: str, answer_a: str, answer_b: str) -> float:
        """The demo task's preference between the two answers (1.0, 0.5 or 0.0)."""
        return self._task.compare(self.instruction(instruction), answer_a, answer_b)

    def category(self, instruction: str) -> str | None:
        """The instruction's category: addition, opposite, next or capital."""
        return self.instruction(instruction).category

    def checks(self, instruction: str, answer: str) -> dict[str, bool]:
        """Whether the answer is correct, and whether it is concise."""
        verdict = self._task.judge(self.instruction(instruction), answer)
        return {"correct": verdict.correct, "concise": verdict.concise}

    def default_prompts(self, n: int | None, seed: int) -> list[str]:
        """`n` of the demo's held-out instructions drawn with `seed` (all of them when `n` is None)."""
        pool = len(self._task.instructions("test"))
        if n is not None and not 1 <= n <= pool:
            raise JudgeError(f"the demo judge has {pool} held-out instructions; {n} were asked for")
        return [instr.text for instr in self._task.held_out_instructions(pool if n is None else n, seed=seed)]


class RewardModelJudge(Judge):
    """A sequence-classification reward model: reward(instruction, answer) = its single logit on the
    rendered conversation; compare() = 1 / 0.5 / 0 as reward(a) >, =, < reward(b).

    The conversation is rendered with the reward model's chat template when its tokenizer has one
    (the prompt's turns, then the assistant turn), else with the recipe's template: render_prompt + format_response.
    An instruction written as a conversation (HH's text, or the recipe's) is read as its turns, as the policy
    reads it (dpo.prompts.read_prompt).
    No EOS is appended, because sequence-classification heads read the last token that is not the pad id, and
    pad == EOS in many tokenizers. `score_batch` (online DPO's k samples per prompt) scores the texts in
    right-padded batches of similar length: the head reads the same token as for the text alone (the rightmost
    that is not the pad id), and causal attention keeps padding out of the real tokens; without a pad id in the
    model's config, texts are scored one at a time.
    """

    def __init__(self, path: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_length: int | None = None):
        try:
            resolved = resolve_model_path(path)
        except ModelLoadError as error:
            raise ModelLoadError(f"reward model (--judge): {error}") from None
        require_tokenizer_files(resolved, f"reward model {path}")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(resolved)
        except Exception as error:  # transformers raises many types for a missing or broken tokenizer
            raise ModelLoadError(f"reward model {path}: no usable tokenizer ({first_line(error)})") from None
        if not self.tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
            raise ModelLoadError(f"reward model {path}: no usable tokenizer (it encodes text to no tokens)")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(resolved, dtype=dtype)
        except Exception as error:
            raise ModelLoadError(f"reward model {path}: cannot be loaded as a sequence-classification model "
                                 f"({first_line(error)})") from None
        if model.config.num_labels != 1:
            raise JudgeError(f"reward model {path}: has {model.config.num_labels} outputs; a reward model has one")
        self.model = model.to(device).eval()
        self.device = torch.device(device)
        self.max_length = max_length
        self.name = path
        self._rewards: dict[tuple[str, str], float] = {}

    def render(self, instruction: str, answer: str) -> str:
        """The conversation the reward model scores, as text (no EOS appended)."""
        prompt = read_prompt(instruction)
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(
                as_messages(prompt) + [{"role": "assistant", "content": answer.strip()}], tokenize=False)
        return render_prompt(prompt, "recipe") + format_response(answer)

    def reward(self, instruction: str, answer: str) -> float:
        """The reward model's logit on the answer to the instruction (cached)."""
        key = (instruction, answer)
        if key not in self._rewards:  # compare() and score() ask for the same rewards
            if len(self._rewards) >= CACHE_LIMIT:  # online DPO scores fresh answers every step
                self._rewards.clear()
            self._rewards[key] = self._reward(instruction, answer)
        return self._rewards[key]

    def _encode(self, instruction: str, answer: str) -> list[int]:
        ids = self.tokenizer(self.render(instruction, answer), truncation=self.max_length is not None,
                             max_length=self.max_length,
                             add_special_tokens=not getattr(self.tokenizer, "chat_template", None))["input_ids"]
        if not ids:
            raise JudgeError(f"reward model {self.name}: its tokenizer encodes the conversation to no tokens")
        return ids

    @torch.no_grad()
    def _reward(self, instruction: str, answer: str) -> float:
        ids = torch.tensor([self._encode(instruction, answer)], device=self.device)
        return finite_reward(self.name, instruction,
                             float(self.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0].float()))

    @torch.no_grad()
    def _score_batch(self, prompts: list[str], responses: list[list[str]]) -> list[list[float]]:
        pad_id = getattr(self.model.config, "pad_token_id", None)
        keys = [(prompt, answer) for prompt, answers in zip(prompts, responses) for answer in answers]
        todo = [key for key in dict.fromkeys(keys) if key not in self._rewards]
        if pad_id is not None and len(todo) > 1:
            if len(self._rewards) + len(todo) > CACHE_LIMIT:
                self._rewards.clear()
            encoded = [self._encode(*key) for key in todo]
            order = sorted(range(len(todo)), key=lambda i: -len(encoded[i]))
            for start in range(0, len(order), REWARD_BATCH):
                rows = order[start:start + REWARD_BATCH]
                width = len(encoded[rows[0]])
                ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(rows), width), dtype=torch.long)
                for row, i in enumerate(rows):
                    ids[row, :len(encoded[i])] = torch.tensor(encoded[i])
                    mask[row, :len(encoded[i])] = 1
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
                for i, value in zip(rows, logits[:, 0].float().tolist()):
                    self._rewards[todo[i]] = finite_reward(self.name, todo[i][0], value)
        return [[self.reward(prompt, answer) for answer in answers] for prompt, answers in zip(prompts, responses)]

    def score(self, instruction: str, answer: str) -> float:
        """The answer's reward."""
        return self.reward(instruction, answer)

    def compare(self, instruction: str, answer_a: str, answer_b: str) -> float:
        """1.0, 0.5 or 0.0 as answer a's reward is above, equal to or below answer b's."""
        return _outcome(self.reward(instruction, answer_a), self.reward(instruction, answer_b))


class ImplicitRewardJudge(Judge):
    """A DPO model's implicit reward r(x, y) = beta (log pi(y|x) - log ref(y|x)) (Rafailov et al. 2023, sec. 5),
    summed over the response tokens of y + EOS, built as the run built its pairs (dpo.data.tokenize_pair with its
    template, max_length, max_prompt_length and truncation). beta, ld_alpha and the reference are the run's
    (dpo_run.json; a TR-DPO run's reference is the model it started from)."""

    def __init__(self, path: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        resolved = resolve_run_model(path)
        self.settings = run_settings(resolved)
        if not self.settings.get("reference_model") or not self.settings.get("beta"):
            raise JudgeError(f"implicit:{path}: not a trained DPO model (no dpo_run.json naming its reference "
                             "model and beta)")
        self.tokenizer = load_checked_tokenizer(resolved)
        self.model = load_causal_lm(resolved, dtype=dtype, device=device).eval()
        self.reference = load_causal_lm(run_reference_model(self.settings), dtype=dtype, device=device).eval()
        self.beta = float(self.settings["beta"])
        self.name = f"implicit:{path}"
        self._rewards: dict[tuple[str, str, str], tuple[float, float]] = {}

    @torch.no_grad()
    def rewards(self, instruction: str, answer_a: str, answer_b: str) -> tuple[float, float]:
        """The implicit rewards of answers a and b, scored as one pair (cached)."""
        key = (instruction, answer_a, answer_b)
        if key not in self._rewards:
            s, template = self.settings, self.settings.get("template", "recipe")
            prompt = render_prompt(instruction, template, self.tokenizer)
            example = PreferenceExample(
                prompt, *(render_response(instruction, answer, template, self.tokenizer, rendered_prompt=prompt)
                          for answer in (answer_a, answer_b)), row=0)
            pair = tokenize_pair(example, self.tokenizer, max_length=s.get("max_length", 1024),
                                 max_prompt_length=s.get("max_prompt_length"),
                                 truncation_mode=s.get("truncation_mode", "keep_end"), template=template)
            if pair is None:
                raise JudgeError(f"{self.name}: the instruction leaves no room for an answer within max_length")
            device = next(self.model.parameters()).device
            batch = {k: v.to(device) for k, v in collate_pairs([pair], self.tokenizer.pad_token_id).items()}
            args = batch["input_ids"], batch["attention_mask"], batch["labels"]
            ld_alpha = s.get("ld_alpha")  # an LD-DPO run's rewards weigh the tails as it trained
            ratio = (sequence_logps(self.model, *args, ld_alpha=ld_alpha).sum
                     - sequence_logps(self.reference, *args, ld_alpha=ld_alpha).sum)
            if len(self._rewards) >= CACHE_LIMIT:
                self._rewards.clear()
            self._rewards[key] = tuple(finite_reward(self.name, instruction, self.beta * float(r)) for r in ratio)
        return self._rewards[key]

    def score(self, instruction: str, answer: str) -> float:
        """The answer's implicit reward."""
        return self.rewards(instruction, answer, answer)[0]

    def compare(self, instruction: str, answer_a: str, answer_b: str) -> float:
        """1.0, 0.5 or 0.0 as answer a's implicit reward is above, equal to or below answer b's."""
        return _outcome(*self.rewards(instruction, answer_a, answer_b))


class FunctionJudge(Judge):
    """A user's judge function: fn(prompts, responses) -> scores (see the module docstring)."""

    def __init__(self, spec: str):
        self.name = spec
        self.function = load_function(spec, "judge", JudgeError, arguments=("prompts", "responses"))

    def _score_batch(self, prompts: list[str], responses: list[list[str]]) -> list[list[float]]:
        return self.function(list(prompts), [list(r) for r in responses])

    def score(self, instruction: str, answer: str) -> float:
        """The function's score of the one answer."""
        return self.score_batch([instruction], [[answer]])[0][0]

    def compare(self, instruction: str, answer_a: str, answer_b: str) -> float:
        """1.0, 0.5 or 0.0 as the function scores answer a above, equal to or below answer b."""
        a, b = self.score_batch([instruction], [[answer_a, answer_b]])[0]
        return _outcome(a, b)


class IFEvalJudge(Judge):
    """IFEval's checkers: a response scores the mean over its prompt's constraints of 1 (followed strictly), 0.5
    (followed loosely only: IFEval's loose variants pass) or 0, so that among samples that all miss strictly, the
    one nearest to following still wins (online DPO skips a prompt whose samples all score alike, or with
    --repair-ties trains on `repair`'s rewrite of one); the category of a prompt is its constraint types; checks are
    IFEval's prompt-level verdicts, strict and loose."""

    name = "ifeval"

    def __init__(self, prompts: Iterable[IFEvalPrompt]):
        self.by_text = {p.prompt.strip(): p for p in prompts}
        self._verdicts: dict[tuple[str, str], tuple[list[bool], list[bool]]] = {}

    @classmethod
    def from_records(cls, records: Mapping[str, tuple[str, Any]] | None) -> "IFEvalJudge":
        """The judge of `records` (prompt text -> (where it comes from, the record with IFEval's fields)). A prompt is
        the mapping's text, the instruction the samples answer: a record whose prompt is written as a conversation
        (HH's or the recipe's text, a message) gives the text of its user turn."""
        if not records:
            raise JudgeError(f"--judge {cls.name} needs prompts that carry IFEval's fields (prompt, "
                             "instruction_id_list, kwargs): a dataset or prompts file such as IFEval's input_data.jsonl")
        seen: dict[str, tuple[str, IFEvalPrompt]] = {}
        try:
            for text, (where, record) in records.items():
                messages = isinstance(record, dict) and isinstance(record.get("prompt"), list)  # a conversation's
                prompt = replace(parse_prompt({**record, "prompt": text} if messages else record, where), prompt=text)
                first_where, first = seen.setdefault(prompt.prompt.strip(), (where, prompt))
                if (first.instruction_id_list, first.kwargs) != (prompt.instruction_id_list, prompt.kwargs):
                    raise JudgeError(f"{where}: its prompt is {first_where}'s but for the white space around it, with "
                                     "other constraints: the judge, which reads a sample's prompt stripped, cannot "
                                     "tell them apart")
        except IFEvalError as error:
            raise JudgeError(str(error)) from None
        return cls(prompt for _, prompt in seen.values())

    def prompt(self, instruction: str) -> IFEvalPrompt:
        """The IFEval prompt whose text this is; a JudgeError for text the judge has no constraints for."""
        try:
            return self.by_text[instruction.strip()]
        except KeyError:
            raise JudgeError(f"the ifeval judge has no constraints for {instruction[:80]!r}: its prompts come with "
                             "their IFEval fields") from None

    def verdicts(self, instruction: str, answer: str) -> tuple[list[bool], list[bool]]:
        """(strict, loose) verdict of each of the prompt's constraints on `answer`."""
        key = (instruction, answer)
        if key not in self._verdicts:
            if len(self._verdicts) >= CACHE_LIMIT:
                self._verdicts.clear()
            self._verdicts[key] = verdicts(self.prompt(instruction), answer)
        return self._verdicts[key]

    def score(self, instruction: str, answer: str) -> float:
        """The mean over the prompt's constraints of 1 followed strictly, 0.5 loosely only, 0 not at all."""
        strict, loose = self.verdicts(instruction, answer)
        return sum(1.0 if s else 0.5 if l else 0.0 for s, l in zip(strict, loose)) / len(strict)

    def compare(self, instruction: str, answer_a: str, answer_b: str) -> float:
        """The answer with the higher score wins; equal scores tie."""
        return _outcome(self.score(instruction, answer_a), self.score(instruction, answer_b))

    def category(self, instruction: str) -> str | None:
        """The prompt's constraint types, comma-joined."""
        return ",".join(self.prompt(instruction).instruction_id_list)

    def checks(self, instruction: str, answer: str) -> dict[str, bool]:
        """IFEval's prompt-level verdicts: every constraint followed, strictly and loosely."""
        strict, loose = self.verdicts(instruction, answer)
        return {"strict": all(strict), "loose": all(loose)}

    can_repair = True

    def repair(self, instruction: str, answer: str) -> str | None:
        """The answer rewritten to follow every constraint strictly (dpo.ifeval_repair), or None."""
        return repair(self.prompt(instruction), answer)


class IFEvalNoEchoJudge(IFEvalJudge):
    """IFEvalJudge for training: an answer that copies the description of one of its prompt's constraints
    (dpo.ifeval.echoed_constraint) scores 0 and is not repaired, since copying it passes the keyword and quotation
    checkers without answering; its checks stay IFEval's own verdicts."""

    name = "ifeval-no-echo"

    def score(self, instruction: str, answer: str) -> float:
        """0 for an answer that echoes the prompt, else IFEvalJudge's score."""
        if echoed_constraint(self.prompt(instruction), answer) is not None:
            return 0.0
        return super().score(instruction, answer)

    def repair(self, instruction: str, answer: str) -> str | None:
        """IFEvalJudge's repair, None where the answer or its rewrite echoes the prompt."""
        prompt = self.prompt(instruction)
        if echoed_constraint(prompt, answer) is not None:
            return None
        rewrite = super().repair(instruction, answer)
        return None if rewrite is None or echoed_constraint(prompt, rewrite) is not None else rewrite


class IFEvalNoEchoNoLoopJudge(IFEvalNoEchoJudge):
    """IFEvalNoEchoJudge for training, and an answer that loops (dpo.repetition.repeats_itself) also scores 0 and is
    not repaired: a loop passes format checkers (a title, a postscript after a list repeated to the token budget)
    without answering, as a copy does, and `dpo.evaluate` counts both as misses."""

    name = "ifeval-no-echo-no-loop"

    def score(self, instruction: str, answer: str) -> float:
        """0 for an answer that loops, else IFEvalNoEchoJudge's score."""
        return 0.0 if repeats_itself(answer) else super().score(instruction, answer)

    def repair(self, instruction: str, answer: str) -> str | None:
        """IFEvalNoEchoJudge's repair, None where the answer or its rewrite loops."""
        if repeats_itself(answer):
            return None
        rewrite = super().repair(instruction, answer)
        return None if rewrite is None or repeats_itself(rewrite) else rewrite


JUDGES = {"demo": DemoJudge}
IFEVAL_JUDGES = {"ifeval": IFEvalJudge, "ifeval-no-echo": IFEvalNoEchoJudge,
                 "ifeval-no-echo-no-loop": IFEvalNoEchoNoLoopJudge}
IMPLICIT_PREFIX = "implicit:"
JUDGE_HELP = ("demo (the demo's task), ifeval (IFEval's checkers; prompts with IFEval's fields), ifeval-no-echo "
              "(the same, an answer copying a constraint of its prompt scoring 0), ifeval-no-echo-no-loop (and a looping "
              "answer scoring 0), a reward model "
              "(directory or hub name), implicit:RUN/final (a DPO model's implicit reward), or your own "
              "'module:function' / 'file.py:function' (prompts, responses) -> scores")


def prompt_records(rows: Iterable[dict[str, Any]], source: str, spec: str | None = None) -> dict[str, tuple[str, Any]]:
    """Instruction rows (dpo.generation.read_instructions) as build_judge's `prompts`: text -> (file and row, row).
    For an IFEval judge (`spec`), a text given twice with other constraints is a JudgeError: it knows a prompt by its
    text and could not tell them apart."""
    records: dict[str, tuple[str, Any]] = {}
    first_rows: dict[str, int] = {}
    for i, row in enumerate(rows):
        _, first = records.setdefault(row["instruction"], (f"{source}, row {i}", row))
        first_row = first_rows.setdefault(row["instruction"], i)
        if spec in IFEVAL_JUDGES and other_constraints(first, row):
            raise JudgeError(constraint_clash(f"{source}, row {i}", first_row))
    return records


def build_judge(spec: str, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                prompts: Mapping[str, tuple[str, Any]] | None = None) -> Judge:
    """'demo' -> DemoJudge; 'ifeval' -> IFEvalJudge of `prompts` (prompt text -> (where it comes from, its record));
    'implicit:PATH' -> a DPO model's implicit reward; 'module:function' or 'file.py:function' -> a user's function;
    anything else is a reward model's directory or hub name."""
    if spec in JUDGES:
        return JUDGES[spec]()
    if spec in IFEVAL_JUDGES:
        return IFEVAL_JUDGES[spec].from_records(prompts)
    if spec.startswith(IMPLICIT_PREFIX):
        return ImplicitRewardJudge(spec[len(IMPLICIT_PREFIX):], device=device, dtype=dtype)
    if is_function_spec(spec):
        return FunctionJudge(spec)
    names = [*JUDGES, *IFEVAL_JUDGES]
    close = difflib.get_close_matches(spec.lower(), names, n=1, cutoff=0.75)
    if close and not Path(spec).exists():  # a misspelled judge, not a reward model's directory or hub name
        raise JudgeError(f"unknown judge {spec!r}: did you mean {close[0]}? (judges: {', '.join(names)}, "
                         "implicit:PATH, a function, or a reward model)")
    return RewardModelJudge(spec, device=device, dtype=dtype)

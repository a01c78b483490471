"""--eval-generate: the policy's win rate against the reference while training, and the implicit-reward judge."""

import contextlib
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from dpo.train_settings import ConfigError, parse_settings
from dpo.generation import DecodingSettings
from dpo.win_rate import SAMPLE_COLUMNS, WinRateEval
from dpo.judges import ImplicitRewardJudge, Judge, JudgeError, build_judge
from dpo.modeling import load_causal_lm
from dpo.prompts import format_prompt, format_response
from harness import make_model_dir, make_run_dir, run_metrics, tiny_tokenizer, train_tiny

PROMPTS = ["what color is the sun?", "tell me about the moon", "is the cat big?", "what is a dog?", "one two three"]


class LengthJudge(Judge):
    """The shorter answer wins; its score is minus the length. A closed form to check the metrics against."""

    name = "length"

    def compare(self, instruction, a, b):
        return 1.0 if len(a) < len(b) else 0.0 if len(a) > len(b) else 0.5

    def score(self, instruction, answer):
        return -float(len(answer))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = make_run_dir(tmp_path_factory.mktemp("geneval"), 48)
    (root / "prompts.jsonl").write_text("".join(json.dumps({"instruction": p}) + "\n" for p in PROMPTS))
    return root


def sampler_for(tmp_path, judge, prompts=PROMPTS, seed=0):
    tokenizer = tiny_tokenizer()
    return WinRateEval(judge, list(prompts), DecodingSettings(max_new_tokens=8, seed=seed), tokenizer, 2,
                          tmp_path / "eval_generate")


def test_the_reference_against_itself_ties_everywhere(workdir, tmp_path):
    model = load_causal_lm(str(workdir / "model"))
    sampler = sampler_for(tmp_path, LengthJudge())
    assert sampler.prepare_reference("key", lambda: (model, contextlib.nullcontext)) is True
    metrics, rows = sampler.run(model)  # same model, same seed: the same answers
    assert metrics["generate/win_rate"] == 0.5 and metrics["generate/ties"] == 1.0
    assert metrics["generate/mean_length"] == metrics["generate/reference_mean_length"]
    assert metrics["generate/score"] == metrics["generate/reference_score"]
    assert len(rows) == 4 and all(row[1] == row[2] and row[3] == "tie" for row in rows)
    assert sampler.prepare_reference("key", lambda: pytest.fail("cached answers must be reused")) is False
    # a cache file cut short (a power cut), or one not of these prompts, is generated again and replaced
    path, answers = sampler.reference_file("key"), sampler.reference_outputs
    whole = path.read_text()
    for damaged in (whole[:len(whole) // 2], "", json.dumps({"outputs": answers[:-1]}), "[1]"):
        path.write_text(damaged)
        assert sampler.prepare_reference("key", lambda: (model, contextlib.nullcontext)) is True
        assert sampler.reference_outputs == answers and path.read_text() == whole


def test_metrics_follow_the_judge_and_the_wilson_interval(workdir, tmp_path):
    model = load_causal_lm(str(workdir / "model"))
    sampler = sampler_for(tmp_path, LengthJudge())
    sampler.reference_outputs = ["x" * 5] * len(PROMPTS)  # every policy answer shorter than 5 characters wins
    metrics, rows = sampler.run(model)
    outputs = [row[2] for row in rows]
    wins = sum(len(o) < 5 for o in sampler._generate(model))
    ties = sum(len(o) == 5 for o in sampler._generate(model))
    n = len(PROMPTS)
    p = (wins + ties / 2) / n
    assert metrics["generate/win_rate"] == pytest.approx(p)
    z = 1.959963984540054
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    assert metrics["generate/win_rate_low"] == pytest.approx(max(0.0, center - half))
    assert metrics["generate/win_rate_high"] == pytest.approx(min(1.0, center + half))
    assert metrics["generate/reference_score"] == -5.0
    assert all(len(row) == len(SAMPLE_COLUMNS) for row in rows) and len(outputs) == 4


def test_sampling_leaves_the_training_rng_alone(workdir, tmp_path):
    model = load_causal_lm(str(workdir / "model"))
    sampler = sampler_for(tmp_path, LengthJudge())
    sampler.reference_outputs = [""] * len(PROMPTS)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sampler.run(model)
    assert torch.equal(torch.rand(3), expected)


def run(workdir, out, *extra):
    return train_tiny(workdir, out, "--batch-size", "8", "--micro-batch-size", "4", "--lr", "1e-3", *extra)


@pytest.mark.slow
def test_a_run_logs_win_rates_and_samples_and_trains_exactly_as_without(workdir, capsys):
    flags = ("--max-steps", "4", "--eval-steps", "2", "--save-steps", "2")
    plain = run(workdir, "plain", *flags)
    watched = run(workdir, "watched", *flags, "--eval-generate", "5", "--eval-prompts", str(workdir / "prompts.jsonl"),
                  "--eval-judge", "implicit:" + str(plain / "final"), "--eval-max-new-tokens", "6")
    a, b = load_file(plain / "final" / "model.safetensors"), load_file(watched / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)  # sampling moved no RNG the training reads
    records = run_metrics(watched)
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    for r in evals:
        assert r["generate/win_rate_low"] <= r["generate/win_rate"] <= r["generate/win_rate_high"]
        assert r["generate/mean_length"] > 0 and "generate/score" in r
    samples = [r for r in records if r["split"] == "samples"]
    assert [r["step"] for r in samples] == [2, 4] and samples[0]["columns"] == SAMPLE_COLUMNS
    assert [row[0] for row in samples[0]["rows"]] == PROMPTS[:4]
    cached = list((watched / "eval_generate").glob("reference-*.json"))
    assert len(cached) == 1 and len(json.loads(cached[0].read_text())["outputs"]) == 5
    out = capsys.readouterr().out
    assert "--eval-generate: 5 prompts judged by implicit:" in out and "reference answers generated" in out
    assert "win rate vs reference" in out
    # resumed from checkpoint-2 (as after a crash in step 3): the reference answers come from the cache, and the
    # step-4 evaluation is the same
    shutil.rmtree(watched / "final")
    assert sorted(p.name for p in watched.glob("checkpoint-*")) == ["checkpoint-2"]
    run(workdir, "watched", *flags, "--eval-generate", "5", "--eval-prompts", str(workdir / "prompts.jsonl"),
        "--eval-judge", "implicit:" + str(plain / "final"), "--eval-max-new-tokens", "6", "--resume")
    assert "reference answers cached" in capsys.readouterr().out
    again = run_metrics(watched, "eval")
    assert again[-1]["generate/win_rate"] == evals[-1]["generate/win_rate"]


@pytest.mark.slow
def test_bad_settings_are_one_line(workdir):
    with pytest.raises(ConfigError, match=r"^--eval-generate 4 does not run under --fsdp .*; pass --eval-generate 0 "):
        parse_settings(["--eval-generate", "4", "--fsdp"])
    with pytest.raises(ConfigError, match="--eval-generate must be a non-negative"):
        parse_settings(["--eval-generate", "-1"])
    trained = make_model_dir(workdir / "implicit-judge" / "final", seed=2)  # a DPO run's final/, judged implicitly
    (trained / "dpo_run.json").write_text(json.dumps({"reference_model": str(workdir / "model"), "beta": 0.1}))
    with pytest.raises(JudgeError, match="has no prompts of its own: give --eval-prompts"):
        run(workdir, "no-prompts", "--max-steps", "1", "--eval-generate", "2", "--eval-judge", f"implicit:{trained}")
    with pytest.raises(JudgeError, match="not a trained DPO model"):
        build_judge("implicit:" + str(workdir / "model"))


def test_an_eval_judge_that_fails_stops_the_run_before_its_first_step(workdir, tmp_path):
    """Before, the judge's first call was at the first evaluation: the steps trained until then were lost."""
    (tmp_path / "judges.py").write_text("def down(prompts, responses):\n    raise ConnectionError('judge server down')\n")
    out = "judge-down"
    with pytest.raises(JudgeError, match=r"judge .*judges.py:down raised ConnectionError: judge server down"):
        run(workdir, out, "--max-steps", "4", "--eval-steps", "2", "--eval-generate", "3", "--eval-prompts",
            str(workdir / "prompts.jsonl"), "--eval-judge", f"{tmp_path / 'judges.py'}:down",
            "--eval-max-new-tokens", "4")
    assert run_metrics(workdir / out, "train") == []


def test_the_reference_s_scores_are_judged_once(workdir, tmp_path):
    calls = []

    class Counting(LengthJudge):
        def score(self, instruction, answer):
            calls.append(answer)
            return super().score(instruction, answer)

    model = load_causal_lm(str(workdir / "model"))
    sampler = sampler_for(tmp_path, Counting())
    sampler.prepare_reference("key", lambda: (model, contextlib.nullcontext))
    assert calls == sampler.reference_outputs  # judged before training starts
    for _ in range(2):
        metrics, _ = sampler.run(model)
        assert metrics["generate/reference_score"] == -sum(map(len, sampler.reference_outputs)) / len(PROMPTS)
    assert len(calls) == 3 * len(PROMPTS)  # then only the policy's answers, at each evaluation

    class ComparesOnly(Counting):
        def score(self, instruction, answer):
            calls.append(answer)
            return None

    calls.clear()
    sampler = sampler_for(tmp_path, ComparesOnly())
    sampler.prepare_reference("key", lambda: pytest.fail("cached answers must be reused"))
    for _ in range(2):
        metrics, _ = sampler.run(model)
        assert "generate/reference_score" not in metrics and "generate/score" not in metrics
    assert len(calls) == 3 * len(PROMPTS)  # a judge that only compares is not asked again for the reference


def test_implicit_reward_judge_matches_a_brute_force_computation(tmp_path):
    reference = make_model_dir(tmp_path / "sft", seed=1)
    final = make_model_dir(tmp_path / "run" / "final", seed=2)
    (final / "dpo_run.json").write_text(json.dumps({"reference_model": str(reference), "beta": 0.25,
                                                    "max_length": 64, "max_prompt_length": 32}))
    judge = build_judge(f"implicit:{tmp_path / 'run'}")
    assert isinstance(judge, ImplicitRewardJudge) and judge.beta == 0.25
    tokenizer = tiny_tokenizer()
    policy, ref = load_causal_lm(str(final)), load_causal_lm(str(reference))

    def logp(model, prompt, response):
        ids = torch.tensor([prompt + response])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        return sum(logprobs[len(prompt) + t - 1, token].item() for t, token in enumerate(response))

    question = "what color is the sun?"
    prompt = tokenizer(format_prompt(question))["input_ids"]
    for answer in ("yellow", "the moon is big"):
        response = tokenizer(format_response(answer))["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            expected = 0.25 * (logp(policy, prompt, response) - logp(ref, prompt, response))
        assert judge.score(question, answer) == pytest.approx(expected, abs=1e-5)
    a, b = judge.score(question, "yellow"), judge.score(question, "the moon is big")
    assert judge.compare(question, "yellow", "the moon is big") == (1.0 if a > b else 0.0)


def test_generation_batch_and_precision_are_the_runs_own(workdir, tmp_path, monkeypatch):
    """The --eval-generate batch is its own setting, not the training micro-batch; sampling runs in the run's
    precision, and answers cached in one precision are not reused in another."""
    import dpo.win_rate

    judged_in = []
    monkeypatch.setattr(dpo.win_rate, "build_judge",
                        lambda name, device, dtype, prompts=None: judged_in.append(dtype) or LengthJudge())
    flags = ["--model", str(workdir / "model"), "--output-dir", str(tmp_path / "run"), "--eval-generate", "5",
             "--eval-prompts", str(workdir / "prompts.jsonl"), "--micro-batch-size", "4", "--batch-size", "8"]
    cpu = torch.device("cpu")
    built = {size: WinRateEval.build(parse_settings(flags + ["--eval-generate-batch-size", size]), tiny_tokenizer(),
                                        cpu) for size in ("3", "16")}
    assert (built["3"].batch_size, built["16"].batch_size) == (3, 16)
    assert built["3"].precision == "fp32"  # auto on a CPU
    half = WinRateEval.build(parse_settings(flags + ["--precision", "bf16"]), tiny_tokenizer(), cpu)
    assert half.precision == "bf16" and half.batch_size == 64
    assert judged_in == [torch.float32, torch.float32, torch.bfloat16]  # a judge model is frozen: autocast dtype
    assert half.reference_file("key") != built["3"].reference_file("key")


def test_eval_prompts_are_drawn_as_dpo_evaluate_draws_them(workdir, tmp_path, monkeypatch):
    """--eval-generate N of an --eval-prompts file: the N rows `python -m dpo.evaluate --prompts FILE --num-prompts N
    --seed S` draws (not the file's first N), so the last win rate logged and the final evaluation judge the same
    prompts; more than the file holds is one line, as it is there."""
    import argparse

    import dpo.win_rate
    from dpo.evaluate import EvaluationError, read_prompt_rows
    from dpo.generation import read_instructions

    monkeypatch.setattr(dpo.win_rate, "build_judge", lambda name, device, dtype, prompts=None: LengthJudge())
    prompts = str(workdir / "prompts.jsonl")
    available = len(read_instructions(prompts))
    flags = ["--model", str(workdir / "model"), "--output-dir", str(tmp_path / "run"), "--eval-prompts", prompts,
             "--seed", "3"]
    cpu = torch.device("cpu")
    built = WinRateEval.build(parse_settings(flags + ["--eval-generate", "4"]), tiny_tokenizer(), cpu)
    drawn = read_prompt_rows(argparse.Namespace(prompts=prompts, num_prompts=4, seed=3))
    assert built.prompts == [row["instruction"] for row in drawn]
    assert built.prompts != [row["instruction"] for row in read_instructions(prompts)[:4]]  # not the first rows
    with pytest.raises(EvaluationError, match=rf"^--eval-generate {available + 1}: \S+prompts.jsonl has {available} "
                                              r"rows$"):
        WinRateEval.build(parse_settings(flags + ["--eval-generate", str(available + 1)]), tiny_tokenizer(), cpu)


def test_the_reference_cache_is_utf8_whatever_the_locale(tmp_path):
    """Written and read back as UTF-8 under the C locale (no UTF-8 mode), where the locale's encoding is ASCII."""
    script = """
import contextlib, json, sys
from pathlib import Path
from dpo.generation import DecodingSettings
from dpo.judges import Judge
from dpo.win_rate import WinRateEval
class Ties(Judge):
    name = "ties"
    def compare(self, instruction, a, b):
        return 0.5
    def score(self, instruction, answer):
        return None
answers = ["Un caf\\u00e9, s'il vous pla\\u00eet."]  # ASCII source: the C locale cannot read it otherwise
cached = WinRateEval(Ties(), ["Qu'est-ce qu'un caf\\u00e9 ?"], DecodingSettings(), None, 1, Path(sys.argv[1]))
cached._generate = lambda model: answers
assert cached.prepare_reference("key", lambda: (None, contextlib.nullcontext)) is True
again = WinRateEval(Ties(), ["Qu'est-ce qu'un caf\\u00e9 ?"], DecodingSettings(), None, 1, Path(sys.argv[1]))
assert again.prepare_reference("key", lambda: 1 / 0) is False and again.reference_outputs == answers
print(json.dumps(again.reference_outputs))
"""
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
    assert json.loads(done.stdout) == ["Un café, s'il vous plaît."]

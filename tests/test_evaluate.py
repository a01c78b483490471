"""dpo.evaluate and dpo.judges: win-rate arithmetic and interval, judges, implicit reward, the CLI."""

import errno
import json
import math
import shutil
import os
import re
from pathlib import Path

import pytest
import torch

from dpo import evaluate
from dpo.data import build_pairs, load_records
from dpo.demo import task
from dpo.evaluate import (Comparison, LoadedModel, WinRate, compare_models, implicit_reward_metrics,
                          wilson_interval, win_rate_summary)
from dpo.generation import DecodingSettings, run_reference_model, run_settings
from dpo.judges import DemoJudge, JudgeError, RewardModelJudge, build_judge
from dpo.prompts import format_prompt, format_response
from dpo.repetition import repeats_itself
from dpo.splits import load_preference_pairs
from dpo.train_settings import TrainSettings
from harness import make_model_dir, make_run_dir, tiny_phi, tiny_tokenizer, write_pairs

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------------------------------------- arithmetic


def _wilson_by_bisection(p_hat: float, n: int, z: float) -> tuple[float, float]:
    """The two roots p of (p_hat - p)^2 = z^2 p (1 - p) / n, found numerically on each side of p_hat."""
    def f(p):
        return (p_hat - p) ** 2 - z * z * p * (1 - p) / n

    def root(lo, hi):  # f(lo) and f(hi) have opposite signs
        for _ in range(200):
            mid = (lo + hi) / 2
            if (f(mid) > 0) == (f(lo) > 0):
                lo = mid
            else:
                hi = mid
        return (lo + hi) / 2

    low = 0.0 if p_hat == 0 else root(0.0, p_hat)
    high = 1.0 if p_hat == 1 else root(p_hat, 1.0)
    return low, high


def test_z_is_the_normal_97_5_percent_quantile():
    assert 0.5 * (1 + math.erf(evaluate.Z_95 / math.sqrt(2))) == pytest.approx(0.975, abs=1e-12)


@pytest.mark.parametrize("p_hat, n, expected", [
    (0.8, 10, (0.4902, 0.9433)),  # published Wilson 95% interval for 8 of 10
    (0.0, 10, (0.0, 0.2775)),
    (1.0, 10, (0.7225, 1.0)),
    (0.5, 100, (0.4038, 0.5962)),
])
def test_wilson_interval_published_values(p_hat, n, expected):
    assert wilson_interval(p_hat, n) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize("p_hat, n", [(0.3, 7), (0.625, 8), (0.95, 243), (0.5, 1), (0.01, 1000), (0.8, 40)])
def test_wilson_interval_solves_the_score_equation(p_hat, n):
    assert wilson_interval(p_hat, n) == pytest.approx(_wilson_by_bisection(p_hat, n, evaluate.Z_95), abs=1e-9)


def test_wilson_interval_rejects_no_trials():
    with pytest.raises(ValueError):
        wilson_interval(0.5, 0)


def test_ties_count_half():
    result = WinRate.from_outcomes([1.0, 1.0, 1.0, 0.5, 0.0])
    assert (result.wins, result.ties, result.losses, result.n) == (3, 1, 1, 5)
    assert result.win_rate == pytest.approx(3.5 / 5)
    summary = result.to_dict()
    assert (summary["ci_low"], summary["ci_high"]) == pytest.approx(wilson_interval(0.7, 5))
    assert set(summary) >= {"win_rate", "ci_low", "ci_high", "wins", "ties", "losses", "n"}
    assert WinRate.from_outcomes([0.5] * 4).win_rate == 0.5
    with pytest.raises(ValueError, match="1.0, 0.5 or 0.0"):
        WinRate.from_outcomes([1.0, 0.3])
    with pytest.raises(ValueError, match="undefined"):
        WinRate.from_outcomes([]).win_rate


# ---------------------------------------------------------------------------------------------------- demo judge


@pytest.fixture(scope="module")
def instruction():
    return next(i for i in task.instructions("test") if i.category == "addition")


def test_demo_judge_verdicts_on_hand_written_answers(instruction):
    judge = DemoJudge()
    q, answer = instruction.text, instruction.answer
    concise, bare, spaced = f"{answer}.", answer, f" {answer}."
    rambling = f"{answer}. I hope this helps."
    wrong, other_wrong = f"{int(answer) + 1}.", f"{int(answer) + 2}. Octopuses have three hearts."
    assert judge.compare(q, concise, rambling) == 1.0
    assert judge.compare(q, rambling, concise) == 0.0
    assert judge.compare(q, rambling, wrong) == 1.0
    assert judge.compare(q, wrong, concise) == 0.0
    assert judge.compare(q, wrong, other_wrong) == 0.5  # two wrong answers tie
    assert judge.compare(q, concise, bare) == 0.5 and judge.compare(q, concise, spaced) == 0.5
    assert judge.compare(q, rambling, f"{answer}. Cats spend most of the day sleeping.") == 0.5
    assert judge.category(q) == "addition"


def test_demo_judge_knows_training_phrasings_too():
    train = task.instructions("train")[0]
    assert DemoJudge().compare(train.text, f"{train.answer}.", "nonsense.") == 1.0


def test_demo_judge_rejects_other_instructions():
    with pytest.raises(JudgeError, match="only knows the demo's instructions"):
        DemoJudge().compare("Write a poem about the sea.", "a", "b")


def test_demo_judge_prompts_are_the_held_out_ones():
    prompts = DemoJudge().default_prompts(7, seed=3)
    assert prompts == [i.text for i in task.held_out_instructions(7, seed=3)]
    assert len(DemoJudge().default_prompts(None, seed=0)) == len(task.instructions("test"))
    with pytest.raises(JudgeError, match="the demo judge has 243 held-out instructions; 244 were asked for"):
        DemoJudge().default_prompts(len(task.instructions("test")) + 1, seed=0)


# ---------------------------------------------------------------------------------------------------- reward model


def _reward_model_dir(path, good_text: str, num_labels: int = 1):
    """A GPT-2 reward model whose reward is +1 when the rendered text ends with the last token of
    `good_text` and -1 otherwise: attention and MLP outputs are zeroed and position embeddings are 0,
    so the last hidden state is LayerNorm(embedding of the last token); embeddings are +-v with
    v = (1, -1, 1, ...), which LayerNorm leaves as they are, and the score head is v / dim."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokenizer = tiny_tokenizer()
    dim = 8
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=dim, n_layer=1, n_head=2, n_positions=128,
                        num_labels=num_labels, pad_token_id=tokenizer.pad_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = GPT2ForSequenceClassification(config)
    v = torch.tensor([1.0, -1.0] * (dim // 2))
    good = tokenizer(good_text, add_special_tokens=False)["input_ids"][-1]
    with torch.no_grad():
        for name, parameter in model.transformer.h.named_parameters():
            if "c_proj" in name:
                parameter.zero_()
        model.transformer.wpe.weight.zero_()
        model.transformer.wte.weight.copy_(-v.expand(len(tokenizer), dim))
        model.transformer.wte.weight[good] = v
        model.score.weight.copy_((v / dim).expand(num_labels, dim))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_reward_model_judge_prefers_the_higher_reward(tmp_path):
    q = "what color is the sun?"
    path = _reward_model_dir(tmp_path / "rm", format_prompt(q) + format_response("yes"))
    judge = build_judge(path)
    assert isinstance(judge, RewardModelJudge)
    assert judge.reward(q, "yes") == pytest.approx(1.0, abs=1e-4)
    assert judge.reward(q, "no") == pytest.approx(-1.0, abs=1e-4)
    assert judge.compare(q, "yes", "no") == 1.0
    assert judge.compare(q, "red", "yes") == 0.0
    assert judge.compare(q, "no", "red") == 0.5  # equal rewards tie
    assert judge.score(q, "yes") == judge.reward(q, "yes")
    assert judge.category(q) is None and judge.default_prompts(3, 0) is None


def test_a_reward_model_whose_reward_is_not_finite_stops_in_one_line_naming_the_prompt(tmp_path):
    """A NaN reward would compare as a tie and reach --output as NaN (not JSON)."""
    from transformers import GPT2ForSequenceClassification

    q = "what color is the sun?"
    path = _reward_model_dir(tmp_path / "rm", format_prompt(q) + format_response("yes"))
    model = GPT2ForSequenceClassification.from_pretrained(path)
    with torch.no_grad():
        model.score.weight.fill_(math.nan)
    model.save_pretrained(path)
    for scoring in (lambda judge: judge.compare(q, "yes", "no"), lambda judge: judge.score_batch([q], [["a", "b"]])):
        with pytest.raises(JudgeError) as error:
            scoring(RewardModelJudge(path))
        assert str(error.value) == f"judge {path}: the reward of an answer to {q!r} is nan, not finite"


def test_reward_model_judge_uses_the_chat_template_when_there_is_one(tmp_path):
    path = _reward_model_dir(tmp_path / "rm", "yes")
    judge = RewardModelJudge(path)
    assert judge.render("q", " a ") == format_prompt("q") + " a"
    # a conversation written as text (HH's, or the recipe's own) is read as its turns, as the policy reads it
    hh, recipe = "\n\nHuman: q\n\nAssistant:", "### Human: q\n\n### Assistant:"
    assert judge.render(hh, "a") == judge.render(recipe, "a") == format_prompt("q") + " a"
    two_turns = "\n\nHuman: q\n\nAssistant: r\n\nHuman: s\n\nAssistant:"
    assert judge.render(two_turns, "a") == "### Human: q\n\n### Assistant: r\n\n### Human: s\n\n### Assistant: a"
    judge.tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    assert judge.render("q", " a ") == "[user] q\n[assistant] a\n"
    assert judge.render(hh, "a") == judge.render(recipe, "a") == "[user] q\n[assistant] a\n"
    assert judge.render(two_turns, "a") == "[user] q\n[assistant] r\n[user] s\n[assistant] a\n"


def test_reward_model_with_several_outputs_is_rejected(tmp_path):
    path = _reward_model_dir(tmp_path / "rm", "yes", num_labels=2)
    with pytest.raises(JudgeError, match="2 outputs"):
        RewardModelJudge(path)
    with pytest.raises(evaluate.ModelLoadError, match=r"^reward model \(--judge\): model directory .*nowhere does not "
                                                      "exist"):
        RewardModelJudge(str(tmp_path / "nowhere"))  # named as the judge, not as some model
    for name in os.listdir(path):  # the weights without the tokenizer: said as for --model
        if name.startswith(("tokenizer", "vocab", "merges", "special_tokens")):
            os.remove(os.path.join(path, name))
    with pytest.raises(evaluate.ModelLoadError, match=rf"^reward model {re.escape(str(path))}: no tokenizer files in "
                                                      r"this directory \(expected one of tokenizer.json, "):
        RewardModelJudge(str(path))


# ---------------------------------------------------------------------------------------------------- comparisons


class _Tok:
    """Counts characters as tokens, for length statistics."""

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [list(t) for t in texts]}


def test_compare_models_scores_from_the_policy_side(monkeypatch):
    held_out = task.held_out_instructions(6, seed=0)
    answers = {"policy": [f"{i.answer}." for i in held_out],
               "reference": [f"{i.answer}. I hope this helps." for i in held_out[:3]]
               + [f"{i.answer}." for i in held_out[3:5]] + ["wrong."]}
    answers["policy"][5] = "also wrong."
    monkeypatch.setattr(evaluate, "generate_batch", lambda model, *args, **kwargs: answers[model])
    policy, reference = LoadedModel("p", "p", "policy", _Tok()), LoadedModel("r", "r", "reference", _Tok())
    comparisons = compare_models(policy, reference, [{"instruction": i.text} for i in held_out], DemoJudge(),
                                 DecodingSettings())
    assert [c.outcome for c in comparisons] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5]
    assert [c.category for c in comparisons] == [i.category for i in held_out]
    summary = win_rate_summary(comparisons, policy, reference)
    assert (summary["wins"], summary["ties"], summary["losses"]) == (3, 3, 0)
    assert summary["win_rate"] == pytest.approx(0.75)
    assert summary["policy_mean_tokens"] == pytest.approx(sum(map(len, answers["policy"])) / 6)
    assert summary["reference_mean_words"] == pytest.approx(sum(len(a.split()) for a in answers["reference"]) / 6)
    assert sum(c["n"] for c in summary["categories"].values()) == 6
    # the demo judge's scores: 1 correct and concise, 0.5 correct only, 0 wrong
    assert summary["policy_mean_score"] == pytest.approx(5 / 6)
    assert summary["reference_mean_score"] == pytest.approx((3 * 0.5 + 2 * 1.0) / 6)
    assert "judge score" in evaluate.format_win_rate(summary, "p", "r")
    # IFEval's types are longer than the label column was: each keeps its whole name, the columns aligned
    long = {"change_case:english_lowercase": summary, "change_case:english_capital": summary}
    table = evaluate.format_win_rate({**summary, "categories": long}, "p", "r").splitlines()
    assert [line.split()[0] for line in table[1:4]] == [*long, "all"]
    assert len({line.index("[") for line in table[1:4]}) == 1
    cell = {"rate": 0.5, "low": 0.4, "high": 0.6, "n": 3}
    metrics = {key: cell for key in ("prompt_strict", "prompt_loose", "instruction_strict", "instruction_loose")}
    side = {**metrics, "types": {"detectable_format:number_highlighted_sections": metrics, "a": metrics}}
    rows = evaluate.format_ifeval(side, side, "p", "r").splitlines()[1:]
    assert len(rows) == 12 and len({line.index("0.500") for line in rows}) == 1  # IFEval's longest type, aligned


def test_prompts_the_judge_cannot_handle_fail_before_generation(monkeypatch):
    def no_generation(*args, **kwargs):
        raise AssertionError("generated before checking the prompts")

    monkeypatch.setattr(evaluate, "generate_batch", no_generation)
    model = LoadedModel("m", "m", None, _Tok())
    with pytest.raises(JudgeError):
        compare_models(model, model, [{"instruction": "Write a haiku."}], DemoJudge(), DecodingSettings())


def test_samples_show_reference_before_and_policy_after():
    text = evaluate.format_samples([Comparison("What is 1 plus 1?", "addition", "2.", "2. Bananas.", 1.0)], 3,
                                   "pol", "ref")
    title = [line for line in text.splitlines() if "|" in line][0]
    assert title.split("|")[0].strip() == "before: ref" and title.split("|")[1].strip() == "after: pol"
    assert "(policy wins)" in text


# ---------------------------------------------------------------------------------------------------- implicit reward


@pytest.mark.parametrize("ld_alpha", [None, 0.4])
def test_implicit_reward_matches_a_brute_force_computation(tmp_path, ld_alpha):
    """With an LD-DPO run's ld_alpha the rewards weigh each response's tokens beyond the pair's shorter one by it;
    the preferred answers' log-likelihood per token counts every token."""
    tokenizer = tiny_tokenizer()
    policy, reference = tiny_phi(vocab_size=len(tokenizer), seed=1), tiny_phi(vocab_size=len(tokenizer), seed=2)
    records, _ = load_records(str(write_pairs(tmp_path / "pairs.jsonl", 7, seed=4)))
    pairs, _ = build_pairs(records, tokenizer, max_length=64, max_prompt_length=32)
    beta = 0.25
    metrics = implicit_reward_metrics(policy, reference, pairs, beta=beta, pad_id=tokenizer.pad_token_id,
                                      batch_size=3, ld_alpha=ld_alpha)

    def logp(model, prompt, response, shared=None):
        ids = torch.tensor([prompt + response])
        logprobs = torch.log_softmax(model(input_ids=ids).logits[0].double(), dim=-1)
        weight = [1.0 if ld_alpha is None or shared is None or t < shared else ld_alpha for t in range(len(response))]
        return sum(w * logprobs[len(prompt) + t - 1, token].item()
                   for t, (token, w) in enumerate(zip(response, weight)))

    margins, chosen, rejected, whole = [], [], [], []
    for pair in pairs:
        k = min(len(pair.chosen_ids), len(pair.rejected_ids))
        r_c = beta * (logp(policy, pair.prompt_ids, pair.chosen_ids, k)
                      - logp(reference, pair.prompt_ids, pair.chosen_ids, k))
        r_r = beta * (logp(policy, pair.prompt_ids, pair.rejected_ids, k)
                      - logp(reference, pair.prompt_ids, pair.rejected_ids, k))
        chosen.append(r_c), rejected.append(r_r), margins.append(r_c - r_r)
        whole.append(logp(policy, pair.prompt_ids, pair.chosen_ids))
    assert ld_alpha is None or any(len(p.chosen_ids) != len(p.rejected_ids) for p in pairs)
    assert metrics["policy_chosen_logp_per_token"] == pytest.approx(
        sum(whole) / sum(len(p.chosen_ids) for p in pairs), abs=1e-5)
    n = len(pairs)
    assert metrics["pairs"] == n == 7
    assert metrics["chosen_reward"] == pytest.approx(sum(chosen) / n, abs=1e-5)
    assert metrics["rejected_reward"] == pytest.approx(sum(rejected) / n, abs=1e-5)
    assert metrics["reward_margin"] == pytest.approx(sum(margins) / n, abs=1e-5)
    assert metrics["reward_accuracy"] == pytest.approx(sum(m > 0 for m in margins) / n)
    assert metrics["dpo_loss"] == pytest.approx(sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / n,
                                                abs=1e-5)


def test_a_model_against_itself_has_zero_implicit_reward(tmp_path):
    tokenizer = tiny_tokenizer()
    model = tiny_phi(vocab_size=len(tokenizer), seed=1)
    records, _ = load_records(str(write_pairs(tmp_path / "pairs.jsonl", 4)))
    pairs, _ = build_pairs(records, tokenizer, max_length=64, max_prompt_length=32)
    metrics = implicit_reward_metrics(model, model, pairs, beta=0.1, pad_id=tokenizer.pad_token_id)
    assert metrics["reward_margin"] == 0.0 and metrics["reward_accuracy"] == 0.0
    assert metrics["dpo_loss"] == pytest.approx(math.log(2))


# ---------------------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 'trained' run: final/ with dpo_run.json naming its starting model, which is another tiny model."""
    root = tmp_path_factory.mktemp("eval")
    reference = make_model_dir(root / "sft", seed=1)
    final = make_model_dir(root / "run" / "final", seed=2)
    (final / "dpo_run.json").write_text(json.dumps({
        "reference_model": str(reference), "beta": 0.1, "dataset": "demo", "eval_split": "test",
        "max_length": 96, "max_prompt_length": 48}))
    return root


def test_a_run_trained_from_a_relative_model_path_finds_its_reference_from_anywhere(tmp_path, monkeypatch, capsys):
    """dpo_run.json records --model as given ("model") and, for a local path, where it is from anywhere: evaluating
    the run from another directory scores against that model, not a hub name "model"."""
    import train

    make_run_dir(tmp_path, 24)
    monkeypatch.chdir(tmp_path)
    assert train.main(["--model", "model", "--dataset", "pairs.jsonl", "--output-dir", "out", "--max-length", "48",
                       "--max-prompt-length", "24", "--test-size", "8", "--max-steps", "1", "--batch-size", "4",
                       "--micro-batch-size", "4", "--no-progress", "--no-plot"]) == 0
    final = tmp_path / "out" / "final"
    monkeypatch.chdir(tmp_path / "out")  # where no ./model is
    settings = run_settings(final)
    assert settings["reference_model"] == "model"
    assert run_reference_model(settings) == str((tmp_path / "model").resolve())
    capsys.readouterr()
    assert evaluate.cli(["--model", str(final), "--skip-win-rate", "--implicit-reward", "--max-pairs", "4",
                         "--no-progress"]) == 0
    assert _json_line(capsys.readouterr().out)["implicit_reward"]["pairs"] == 4
    assert build_judge(f"implicit:{final}").compare("hi", "a", "b") in (0.0, 0.5, 1.0)
    # the recorded path wins over a directory of that name here; gone (the model moved), the name as given
    (tmp_path / "out" / "model").mkdir()
    assert run_reference_model(settings) == str((tmp_path / "model").resolve())
    assert run_reference_model({**settings, "reference_model_path": str(tmp_path / "gone")}) == "model"
    # a LoRA run's final/ is an adapter: its adapter_config.json names the base by its path from anywhere too
    monkeypatch.chdir(tmp_path)
    assert train.main(["--model", "model", "--dataset", "pairs.jsonl", "--output-dir", "lora", "--max-length", "48",
                       "--max-prompt-length", "24", "--test-size", "8", "--max-steps", "1", "--batch-size", "4",
                       "--micro-batch-size", "4", "--lora-r", "4", "--no-progress", "--no-plot"]) == 0
    adapter_config = json.loads((tmp_path / "lora" / "final" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((tmp_path / "model").resolve())
    monkeypatch.chdir(tmp_path / "lora")
    capsys.readouterr()
    assert evaluate.cli(["--model", "final", "--skip-win-rate", "--implicit-reward", "--max-pairs", "4",
                         "--no-progress"]) == 0
    assert _json_line(capsys.readouterr().out)["implicit_reward"]["pairs"] == 4


def test_a_reference_without_the_policy_s_chat_template_is_refused_before_any_generation(run_dir, tmp_path,
                                                                                         monkeypatch, capsys):
    from transformers import AutoTokenizer

    policy = tmp_path / "chat-policy"
    shutil.copytree(run_dir / "run" / "final", policy)
    tokenizer = AutoTokenizer.from_pretrained(policy)
    tokenizer.chat_template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    tokenizer.save_pretrained(policy)
    monkeypatch.setattr(evaluate, "compare_models", lambda *args, **kwargs: pytest.fail("generated first"))
    args = ["--model", str(policy), "--num-prompts", "2", "--max-new-tokens", "4", "--no-progress"]
    assert evaluate.cli(args) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: reference {run_dir / 'sft'} (the run's starting model, from dpo_run.json): its tokenizer has no chat "
        "template, and the prompts are rendered with the chat template; pass --no-chat-template (both models "
        "prompted with the recipe's '### Human:' template) or another --reference")
    monkeypatch.undo()
    assert evaluate.cli([*args, "--no-chat-template"]) == 0


def _json_line(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_cli_win_rate_defaults_to_the_runs_reference(run_dir, capsys):
    args = ["--model", str(run_dir / "run"), "--num-prompts", "6", "--max-new-tokens", "6", "--no-progress",
            "--samples", "2"]
    assert evaluate.cli(args) == 0
    out = capsys.readouterr().out
    result = _json_line(out)
    assert f"reference  {run_dir / 'sft'} (the run's starting model, from dpo_run.json)" in out
    assert result["reference"] == "sft" and result["policy"] == "run/final" and result["judge"] == "demo"
    assert result["n"] == 6 and result["wins"] + result["ties"] + result["losses"] == 6
    assert result["win_rate"] == pytest.approx((result["wins"] + 0.5 * result["ties"]) / 6)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx(wilson_interval(result["win_rate"], 6))
    assert result["prompt_budget"] == {"policy": 48, "reference": 48}  # the run's max_prompt_length
    assert sum(c["n"] for c in result["categories"].values()) == 6
    assert out.count("before: sft") == 2
    assert evaluate.cli(args) == 0  # seeded: the same numbers again
    assert _json_line(capsys.readouterr().out) == result


def test_cli_implicit_reward_only(run_dir, capsys, tmp_path):
    output = tmp_path / "report.json"
    assert evaluate.cli(["--model", str(run_dir / "run" / "final"), "--skip-win-rate", "--implicit-reward",
                         "--max-pairs", "8", "--batch-size", "4", "--output", str(output)]) == 0
    result = _json_line(capsys.readouterr().out)
    assert "win_rate" not in result
    assert result["implicit_reward"]["pairs"] == 8 and result["implicit_reward"]["beta"] == 0.1
    assert result["implicit_reward"]["split"] == "test" and result["implicit_reward"]["dataset"] == "demo"
    assert json.loads(output.read_text()) == {"summary": result, "comparisons": []}  # --output is written too


def test_implicit_reward_scores_the_pairs_a_run_split_off_its_file(run_dir, capsys, tmp_path, monkeypatch):
    """A run on one .jsonl file held out --test-size of it at training time: --implicit-reward scores exactly those
    pairs (what train.py's load_preference_pairs holds out), never the pairs it trained on; --max-pairs takes the
    first of them; --split cannot reach the training part."""
    data = str(write_pairs(tmp_path / "pairs.jsonl", 60, seed=4))
    cfg = TrainSettings(model=str(run_dir / "sft"), dataset=data, test_size=0.2, seed=7, max_length=96,
                        max_prompt_length=48, template="recipe")
    tokenizer = tiny_tokenizer()
    loaded = load_preference_pairs(cfg, tokenizer, log=lambda *args: None)
    held_out = loaded.eval
    assert len(held_out) == 12
    run = {**cfg.to_dict(), "held_out_by": "prompt"}
    pairs, description, split = evaluate.load_eval_pairs(data, None, tokenizer, run, None)
    assert pairs == held_out and split == "held out by --test-size 0.2 (seed 7)"
    assert description.startswith(f"12 pairs split off {data} (--test-size 0.2)")
    assert evaluate.load_eval_pairs(data, None, tokenizer, run, 5)[0] == held_out[:5]
    final = make_model_dir(tmp_path / "run" / "final", seed=2)
    (final / "dpo_run.json").write_text(json.dumps({**cfg.to_dict(), "reference_model": str(run_dir / "sft"),
                                                    "held_out_digest": loaded.held_out_digest,
                                                    "held_out_by": "prompt"}))
    assert evaluate.cli(["--model", str(final), "--skip-win-rate", "--implicit-reward"]) == 0
    result = _json_line(capsys.readouterr().out)["implicit_reward"]
    assert (result["pairs"], result["split"], result["dataset"]) == (12, split, data)
    # the file grown by one row since: its split drawn again would hold out pairs the run trained on
    original = Path(data).read_text()
    Path(data).write_text(original + original.splitlines(keepends=True)[0])
    assert evaluate.load_eval_pairs(data, None, tokenizer, run, None)[0] != held_out  # the reason
    assert evaluate.cli(["--model", str(final), "--skip-win-rate", "--implicit-reward"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {data} has changed since the run split off its held-out pairs (--test-size 0.2, seed 7): drawn "
        "again they are not the pairs it held out (and may be pairs it trained on); score the data as it was, or name "
        "pairs of your own with --dataset")
    Path(data).write_text(original)
    assert evaluate.cli(["--model", str(final), "--skip-win-rate", "--implicit-reward", "--split", "train"]) == 2
    assert capsys.readouterr().err.strip() == f"error: {data}: a single file has no splits; leave out --split train"
    # beside the win rate too, a missing --dataset or split fails before any model answers a prompt
    monkeypatch.setattr(evaluate, "compare_models", lambda *args, **kwargs: pytest.fail("generated first"))
    for flags in (["--dataset", str(tmp_path / "nope.jsonl")], ["--split", "train"]):
        assert evaluate.cli(["--model", str(final), "--implicit-reward", "--num-prompts", "2", *flags]) == 2
        assert capsys.readouterr().err.startswith("error: ")


def test_a_prompts_pairs_are_held_out_together_and_earlier_runs_are_drawn_as_they_split(run_dir, tmp_path):
    """Three pairs per prompt: --test-size holds out whole prompts, so the held-out loss is measured on prompts the
    run never trained on, and dpo.evaluate draws the same pairs; a run that records no held_out_by (an earlier
    version's, which split pair by pair) is drawn pair by pair, as it split."""
    from dpo.data import train_test_split

    rows = [json.loads(line) for line in write_pairs(tmp_path / "base.jsonl", 20, seed=5).read_text().splitlines()]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({**row, "chosen": row["chosen"] + suffix}) + "\n"
                            for row in rows for suffix in ("", " again", " once more")))
    cfg = TrainSettings(model=str(run_dir / "sft"), dataset=str(data), test_size=0.2, seed=7, max_length=96,
                        max_prompt_length=48, template="recipe")
    tokenizer = tiny_tokenizer()
    loaded = load_preference_pairs(cfg, tokenizer, log=lambda *args: None)
    prompts = lambda pairs: {tuple(pair.prompt_ids) for pair in pairs}
    assert not prompts(loaded.eval) & prompts(loaded.train) and len(loaded.eval) % 3 == 0 and len(loaded.eval) >= 12
    run = {**cfg.to_dict(), "held_out_by": "prompt"}
    assert evaluate.load_eval_pairs(str(data), None, tokenizer, run, None)[0] == loaded.eval
    earlier = evaluate.load_eval_pairs(str(data), None, tokenizer, cfg.to_dict(), None)[0]
    _, by_pair = train_test_split(list(range(60)), 0.2, seed=7)
    assert [pair.row for pair in earlier] == by_pair and prompts(earlier) & prompts(loaded.train)


def test_a_run_given_a_relative_dataset_path_is_evaluated_on_its_held_out_pairs_from_anywhere(run_dir, capsys,
                                                                                              tmp_path, monkeypatch):
    """dpo_run.json records --dataset as given (relative to where train.py ran) and the path from anywhere: from
    another directory, the default dataset and the same file named by its absolute path both give the held-out
    pairs, not the whole file."""
    (tmp_path / "project").mkdir()
    write_pairs(tmp_path / "project" / "pairs.jsonl", 60, seed=4)
    cfg = TrainSettings(model=str(run_dir / "sft"), dataset="pairs.jsonl", test_size=0.2, seed=7, max_length=96,
                        max_prompt_length=48, template="recipe")
    final = make_model_dir(tmp_path / "project" / "run" / "final", seed=2)
    (final / "dpo_run.json").write_text(json.dumps({**cfg.to_dict(), "reference_model": str(run_dir / "sft"),
                                                    "dataset_path": str(tmp_path / "project" / "pairs.jsonl")}))
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    for dataset in ([], ["--dataset", str(tmp_path / "project" / "pairs.jsonl")]):
        assert evaluate.cli(["--model", str(final), "--skip-win-rate", "--implicit-reward", *dataset]) == 0
        result = _json_line(capsys.readouterr().out)["implicit_reward"]
        assert (result["pairs"], result["split"]) == (12, "held out by --test-size 0.2 (seed 7)")


def test_cli_a_model_against_itself_ties_everywhere(run_dir, capsys):
    model = str(run_dir / "sft")
    assert evaluate.cli(["--model", model, "--reference", model, "--num-prompts", "5", "--max-new-tokens", "5",
                         "--no-progress", "--samples", "0"]) == 0
    result = _json_line(capsys.readouterr().out)
    assert (result["ties"], result["win_rate"]) == (5, 0.5)


@pytest.mark.parametrize("case, message", [
    ("no_reference", "--reference is required"),
    ("zero_tokens", "--max-new-tokens must be at least 1"),
    ("prompts_without_instruction", "no 'instruction' or 'prompt' field"),
    ("reward_model_without_prompts", "has no prompts of its own"),
    ("bad_settings", "dpo_run.json: not valid JSON"),
])
def test_cli_bad_input_is_one_line_and_exit_code_2(tmp_path, run_dir, capsys, case, message):
    sft = str(run_dir / "sft")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"instruction": "Write a haiku."}\n' if case == "foreign_prompts" else '{"text": "a"}\n')
    broken = make_model_dir(tmp_path / "broken") if case == "bad_settings" else None
    if broken is not None:
        (broken / "dpo_run.json").write_text("{not json")
    rm = _reward_model_dir(tmp_path / "rm", "yes") if case == "reward_model_without_prompts" else None
    args = {
        "no_reference": ["--model", sft],
        "zero_tokens": ["--model", sft, "--reference", sft, "--max-new-tokens", "0"],
        "prompts_without_instruction": ["--model", sft, "--reference", sft, "--prompts", str(prompts)],
        "reward_model_without_prompts": ["--model", sft, "--reference", sft, "--judge", str(rm)],
        "bad_settings": ["--model", str(broken)],
    }[case]
    capsys.readouterr()  # drop what building the test models printed
    assert evaluate.cli(args + ["--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err


def _refuse_to_load(monkeypatch):
    """Loading a model or a judge fails the test: paths are checked before anything is loaded."""
    def load(*args, **kwargs):
        raise AssertionError("something was loaded before the paths were checked")
    monkeypatch.setattr(evaluate, "load_model", load)
    monkeypatch.setattr(evaluate, "build_judge", load)


@pytest.mark.parametrize("case, message", [
    ("missing_model", "model directory {tmp}/nope does not exist"),
    ("missing_model_with_reference", "model directory {tmp}/nope does not exist"),
    ("missing_reference", "model directory {tmp}/gone does not exist"),
    ("missing_gguf_model", "model {tmp}/nope.gguf: GGUF file not found"),  # as generate.py names it
    ("missing_gguf_reference", "model {tmp}/nope.gguf: GGUF file not found"),
    ("runs_reference_missing", "{tmp}/moved/dpo_run.json: its reference_model: model directory {tmp}/gone does not "
                               "exist; pass --reference MODEL"),
    ("output_directory", "--output {tmp}: is a directory"),
    ("output_under_a_file", "--output {tmp}/file.json/o.json: its parent {tmp}/file.json is not a directory"),
    ("output_not_writable", "--output {tmp}/o.json: cannot write there (Permission denied)"),
])
def test_cli_missing_models_and_unwritable_output_fail_before_loading(tmp_path, run_dir, monkeypatch, capsys, case,
                                                                      message):
    sft, run, missing = str(run_dir / "sft"), str(run_dir / "run"), str(tmp_path / "nope")
    (tmp_path / "file.json").write_text("{}")
    if case == "runs_reference_missing":
        moved = make_model_dir(tmp_path / "moved")
        (moved / "dpo_run.json").write_text(json.dumps({"reference_model": str(tmp_path / "gone")}))
    if case == "output_not_writable":  # a directory that refuses new files, also where the tests run as root
        def refuse(*args, **kwargs):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
        monkeypatch.setattr("tempfile.mkstemp", refuse)
    args = {
        "missing_model": ["--model", missing],
        "missing_model_with_reference": ["--model", missing, "--reference", sft],
        "missing_reference": ["--model", run, "--reference", str(tmp_path / "gone")],
        "missing_gguf_model": ["--model", missing + ".gguf"],
        "missing_gguf_reference": ["--model", run, "--reference", missing + ".gguf"],
        "runs_reference_missing": ["--model", str(tmp_path / "moved")],
        "output_directory": ["--model", run, "--output", str(tmp_path)],
        "output_under_a_file": ["--model", run, "--output", str(tmp_path / "file.json" / "o.json")],
        "output_not_writable": ["--model", run, "--output", str(tmp_path / "o.json")],
    }[case]
    _refuse_to_load(monkeypatch)
    capsys.readouterr()  # drop what building the test models printed
    assert evaluate.cli(args + ["--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: {message.format(tmp=tmp_path)}\n"
    assert not (tmp_path / "o.json").exists() and (tmp_path / "file.json").read_text() == "{}"



@pytest.mark.parametrize("case, message", [
    ("foreign_prompts", "the demo judge only knows the demo's instructions, not 'Write a haiku.'"),
    ("more_prompts_than_rows", "--num-prompts 5: {tmp}/prompts.jsonl has 1 rows"),
    ("implicit_flag_alone", "--beta is for --implicit-reward, which this command does not ask for"),
    ("win_rate_flag_skipped", "--prompts is for the win rate, which --skip-win-rate leaves out"),
])
def test_cli_refuses_prompts_and_flags_that_cannot_work_before_any_model_answers(tmp_path, run_dir, monkeypatch,
                                                                                 capsys, case, message):
    """The demo judge's refusal of a foreign prompt came after both models had answered every prompt; a flag of a
    part that does not run was ignored in silence."""
    run = str(run_dir / "run")
    prompts = tmp_path / "prompts.jsonl"
    instruction = "Write a haiku." if case == "foreign_prompts" else task.held_out_instructions(1)[0].text
    prompts.write_text(json.dumps({"instruction": instruction}) + "\n")
    args = {"foreign_prompts": ["--prompts", str(prompts)],
            "more_prompts_than_rows": ["--prompts", str(prompts), "--num-prompts", "5"],
            "implicit_flag_alone": ["--beta", "5"],
            "win_rate_flag_skipped": ["--implicit-reward", "--skip-win-rate", "--prompts", str(prompts)]}[case]

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the prompts and flags were checked")

    monkeypatch.setattr(evaluate, "load_model", load)
    capsys.readouterr()
    assert evaluate.cli(["--model", run, *args, "--no-progress"]) == 2
    assert capsys.readouterr().err == f"error: {message.format(tmp=tmp_path)}\n"

def test_a_run_directory_is_a_model_to_check(run_dir, tmp_path):
    for name in (run_dir / "run", run_dir / "run" / "final", run_dir / "sft"):
        evaluate.check_model(str(name))  # a run directory stands for its final/, as when it is loaded
    (tmp_path / "empty").mkdir()
    with pytest.raises(evaluate.ModelLoadError, match="no config.json"):
        evaluate.check_model(str(tmp_path / "empty"))


def test_cli_output_failing_while_written_leaves_the_earlier_file(tmp_path, run_dir, monkeypatch, capsys):
    output = tmp_path / "report.json"
    output.write_text("earlier report\n")

    def disk_full(fd):  # after the report went into the temporary file, before it replaces the output
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", disk_full)
    assert evaluate.cli(["--model", str(run_dir / "run"), "--num-prompts", "2", "--max-new-tokens", "2",
                         "--samples", "0", "--no-progress", "--output", str(output)]) == 2
    assert capsys.readouterr().err == f"error: {output}: cannot be written (No space left on device)\n"
    assert output.read_text() == "earlier report\n" and os.listdir(tmp_path) == ["report.json"]
    monkeypatch.undo()
    assert evaluate.cli(["--model", str(run_dir / "run"), "--num-prompts", "2", "--max-new-tokens", "2",
                         "--samples", "0", "--no-progress", "--output", str(output)]) == 0
    assert json.loads(output.read_text())["summary"]["n"] == 2 and os.listdir(tmp_path) == ["report.json"]


def test_correct_and_concise_rates_per_category():
    held_out = task.held_out_instructions(4, seed=0)
    judge = DemoJudge()
    comparisons = []
    for i, instr in enumerate(held_out):
        right = instr.answer + "." if i % 2 else instr.answer + ". And more words."
        wrong = "nothing."
        comparisons.append(Comparison(instr.text, instr.category, right, wrong, judge.compare(instr.text, right, wrong),
                                      policy_checks=judge.checks(instr.text, right),
                                      reference_checks=judge.checks(instr.text, wrong)))
    rates = evaluate.check_rates(comparisons)
    assert rates == {"policy_correct": 1.0, "policy_concise": 0.5, "reference_correct": 0.0, "reference_concise": 1.0}
    table = evaluate.format_checks({**rates, "categories": {}})
    assert "correct policy" in table and table.splitlines()[-1].split() == ["all", "1.00", "0.00", "0.50", "1.00"]


def test_reward_model_scores_a_batch_as_it_scores_each_text_alone(tmp_path):
    """Online DPO's score_batch runs right-padded batches: each reward equals the text scored alone (random
    weights, attention on: padding must not leak into a text, and the head must read the text's own last token)."""
    from transformers import GPT2Config, GPT2ForSequenceClassification

    tokenizer = tiny_tokenizer()
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=16, n_layer=2, n_head=2, n_positions=128, num_labels=1,
                        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2ForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    prompts = ["what color is the sun?", "tell me about the moon", "is the cat big?"]
    responses = [["yes", "the sun is a big yellow star", "no", "yes"], ["one two three four five six", "a", "moon"],
                 ["small", "the cat is big and fast and red", "slow"]]
    batched = build_judge(str(tmp_path / "rm")).score_batch(prompts, responses)
    alone = build_judge(str(tmp_path / "rm"))
    want = [[alone._reward(p, a) for a in answers] for p, answers in zip(prompts, responses)]
    assert [len(row) for row in batched] == [4, 3, 3]
    for got_row, want_row in zip(batched, want):
        assert got_row == pytest.approx(want_row, abs=1e-5)
    assert len({round(v, 6) for row in want for v in row}) > 5  # the texts' rewards differ: the check can fail


def test_repetition_counts_answers_that_loop():
    """An answer repeats itself when some 6 consecutive words occur 3 times or more (overlaps count); the summary
    gives each model's share and the report prints it only when some answer repeats."""
    loop = "Paris is a city that has the beauty and the beauty and the beauty and the beauty and"
    assert repeats_itself(loop)
    assert repeats_itself("go " * 8)  # one word 8 times: the same 6 words 3 times, overlapping
    assert not repeats_itself("go " * 7)  # twice only
    assert not repeats_itself("one two three four five six one two three four five six")  # twice
    assert repeats_itself("one two three four five six " * 3)
    assert not repeats_itself("") and not repeats_itself("a b c d e f g h i j k l")
    comparisons = [Comparison("q", None, answer, "fine answer.", 0.5) for answer in (loop, "4.", "go " * 8, "ok")]
    model = LoadedModel("m", "m", None, _Tok())
    summary = win_rate_summary(comparisons, model, model)
    assert (summary["policy_repeating"], summary["reference_repeating"]) == (0.5, 0.0)
    assert evaluate.format_repetition(summary) == "answers repeating 6 words 3+ times: policy 0.500, reference 0.000"
    assert evaluate.format_repetition({**summary, "policy_repeating": 0.0}) == ""
    assert "repeating" not in evaluate.format_checks(summary)


def test_help_shows_each_default_once():
    import generate

    for parser in (evaluate.build_parser(), generate.build_parser()):
        text = " ".join(parser.format_help().split())
        assert "(default: None)" not in text and ") (default:" not in text
    assert "samples to print (default: 3)" in " ".join(evaluate.build_parser().format_help().split())


def test_the_report_names_the_prompt_budget_the_model_positions_set(run_dir, capsys):
    # no dpo_run.json: room for the new tokens in the model's 256 positions, as generation computed it
    assert evaluate.cli(["--model", str(run_dir / "sft"), "--reference", str(run_dir / "sft"), "--num-prompts", "2",
                         "--max-new-tokens", "6", "--samples", "0", "--no-progress"]) == 0
    result = _json_line(capsys.readouterr().out)
    assert result["decoding"]["max_prompt_length"] is None
    assert result["prompt_budget"] == {"policy": 250, "reference": 250}

"""The embedded demo: synthetic task generator, judge, and the shipped SFT model assets."""

import os
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, AutoTokenizer, PhiConfig  # noqa: E402

from dpo.demo import task  # noqa: E402
from dpo.demo.build import (DEFAULT_OUT, IGNORE_INDEX, BuildSettings, collate_sft, make_model,  # noqa: E402
                            sft_loss, train_tokenizer)
from dpo.demo.task import Instruction, compare, judge  # noqa: E402
from dpo.prompts import format_prompt, format_response  # noqa: E402

ASSETS = DEFAULT_OUT
MAX_ASSET_BYTES = 4_500_000


def one_instruction(category: str, split: str = "train") -> Instruction:
    return next(i for i in task.instructions(split) if i.category == category)


# ---------------------------------------------------------------- generator


def test_generators_are_deterministic_for_a_seed_and_differ_across_seeds():
    assert task.sft_records(200, seed=0) == task.sft_records(200, seed=0)
    assert task.sft_records(200, seed=0) != task.sft_records(200, seed=1)
    for split in task.SPLITS:
        assert task.preference_records(split, 100, seed=0) == task.preference_records(split, 100, seed=0)
        assert task.preference_records(split, 100, seed=0) != task.preference_records(split, 100, seed=1)
    assert task.held_out_instructions(50, seed=0) == task.held_out_instructions(50, seed=0)
    assert task.held_out_instructions(50, seed=0) != task.held_out_instructions(50, seed=1)
    rng_a, rng_b = random.Random(7), random.Random(7)
    assert [task.sample_instruction(rng_a) for _ in range(20)] == [task.sample_instruction(rng_b) for _ in range(20)]


def test_default_preference_sizes_and_fields():
    train, test = task.preference_records("train"), task.preference_records("test")
    assert len(train) == task.DEFAULT_PREFERENCE_SIZES["train"]
    assert len(test) == task.DEFAULT_PREFERENCE_SIZES["test"]
    assert set(train[0]) == {"prompt", "chosen", "rejected", "category"}
    assert {r["category"] for r in train} == set(task.CATEGORIES)


def test_held_out_instructions_never_appear_in_training_text():
    held_out = {i.text for i in task.instructions("test")}
    train = {i.text for i in task.instructions("train")}
    assert held_out and train and not held_out & train
    assert not held_out & {r["prompt"] for r in task.sft_records(5000, seed=0)}
    assert not held_out & {r["prompt"] for r in task.preference_records("train")}
    assert {r["prompt"] for r in task.preference_records("test")} <= held_out
    assert {i.text for i in task.held_out_instructions(len(held_out), seed=3)} == held_out
    # The whole held-out set is sampled without repeats, and no more than that can be asked for.
    with pytest.raises(ValueError, match="held-out"):
        task.held_out_instructions(len(held_out) + 1)


def test_every_held_out_fact_is_taught_by_other_phrasings():
    train_facts = Counter((i.category, i.answer) for i in task.instructions("train"))
    for instr in task.instructions("test"):
        assert train_facts[(instr.category, instr.answer)] >= task.N_PHRASINGS - 1, instr


def test_every_chosen_is_good_and_beats_its_rejected():
    for split in task.SPLITS:
        by_text = {i.text: i for i in task.instructions(split)}
        for r in task.preference_records(split):
            instr = by_text[r["prompt"]]
            assert instr.category == r["category"]
            verdict = judge(instr, r["chosen"])
            assert verdict.correct and verdict.concise and verdict.score == 1.0, r
            assert compare(instr, r["chosen"], r["rejected"]) == 1.0, r
            assert compare(instr, r["rejected"], r["chosen"]) == 0.0, r


def test_rejected_answers_cover_both_failure_modes():
    kinds = Counter()
    by_text = {i.text: i for i in task.instructions("train")}
    for r in task.preference_records("train"):
        v = judge(by_text[r["prompt"]], r["rejected"])
        kinds["rambling" if v.correct else "wrong"] += 1
        assert not v.concise or not v.correct
    assert 0.4 < kinds["rambling"] / sum(kinds.values()) < 0.6


def test_sft_mix_is_mostly_rambling_some_wrong_few_concise():
    records = task.sft_records(4000, seed=0)
    by_text = {i.text: i for i in task.instructions("train")}
    verdicts = [judge(by_text[r["prompt"]], r["response"]) for r in records]
    good = sum(v.correct and v.concise for v in verdicts) / len(verdicts)
    rambling = sum(v.correct and not v.concise for v in verdicts) / len(verdicts)
    wrong = sum(not v.correct for v in verdicts) / len(verdicts)
    assert good == pytest.approx(task.SFT_MIX["concise"], abs=0.02)
    assert rambling == pytest.approx(task.SFT_MIX["rambling"], abs=0.03)
    assert wrong == pytest.approx(task.SFT_MIX["wrong"], abs=0.03)
    assert rambling > 0.5 and good < wrong < rambling


def test_answer_builders():
    rng = random.Random(0)
    for category in task.CATEGORIES:
        instr = one_instruction(category)
        assert task.concise_answer(instr) == instr.answer + "."
        rambling = task.rambling_answer(instr, rng)
        assert rambling.startswith(instr.answer + ". ")
        assert any(s in rambling for s in task.RAMBLING_BANK)
        wrong = task.wrong_answer(instr, rng)
        assert wrong.endswith(".") and wrong[:-1] != instr.answer


def test_unknown_split_and_instruction_are_clear_errors():
    with pytest.raises(ValueError, match="split"):
        task.preference_records("validation")
    with pytest.raises(ValueError, match="split"):
        task.sample_instruction(random.Random(0), split="dev")
    with pytest.raises(ValueError, match="not an instruction of the demo task"):
        task.wrong_answer(Instruction("What is 12 plus 30?", "42", "addition"), random.Random(0))


# ---------------------------------------------------------------- judge

JUDGE_CASES = {
    "addition": (Instruction("What is 3 plus 4?", "7", "addition"), "8"),
    "opposite": (Instruction("What is the opposite of hot?", "cold", "opposite"), "warm"),
    "next": (Instruction("What comes after Monday?", "Tuesday", "next"), "Wednesday"),
    "capital": (Instruction("What is the capital of Zorbia?", "Kelmar", "capital"), "Prennholt"),
}


@pytest.mark.parametrize("category", sorted(JUDGE_CASES))
def test_judge_hand_written_answers(category):
    instr, wrong = JUDGE_CASES[category]
    right = instr.answer
    cases = {  # answer -> (correct, concise, score)
        right: (True, True, 1.0),
        right + ".": (True, True, 1.0),
        " " + right + ".": (True, True, 1.0),
        "\n " + right + " .  ": (True, True, 1.0),
        right.upper() + ".": (True, True, 1.0),
        right + ". I hope this helps.": (True, False, 0.5),
        right + ". Bananas are technically berries. Cats spend most of the day sleeping.": (True, False, 0.5),
        right + "!": (True, False, 0.5),
        right + "..": (True, False, 0.5),
        right + "\nMore text": (True, False, 0.5),
        wrong + ".": (False, True, 0.0),
        " " + wrong: (False, True, 0.0),
        wrong + ". I hope this helps.": (False, False, 0.0),
        "": (False, False, 0.0),
        "   ": (False, False, 0.0),
        ".": (False, False, 0.0),
        right + " is the answer.": (False, True, 0.0),
        "The answer is " + right + ".": (False, True, 0.0),
        right + right + ".": (False, True, 0.0),
    }
    for answer, (correct, concise, score) in cases.items():
        verdict = judge(instr, answer)
        assert (verdict.correct, verdict.concise, verdict.score) == (correct, concise, score), repr(answer)
        assert verdict.category == category


def test_compare_orders_kinds_and_is_antisymmetric():
    instr = JUDGE_CASES["addition"][0]
    concise, rambling, wrong, wrong_rambling = "7.", " 7. I hope this helps.", "8.", "6. I hope this helps."
    assert compare(instr, concise, rambling) == 1.0
    assert compare(instr, rambling, wrong) == 1.0
    assert compare(instr, concise, wrong) == 1.0
    assert compare(instr, wrong, wrong_rambling) == 0.5  # two wrong answers tie
    assert compare(instr, concise, " 7") == 0.5
    answers = [concise, rambling, wrong, wrong_rambling, "", "7", "7!", "nonsense"]
    for a in answers:
        assert compare(instr, a, a) == 0.5
        for b in answers:
            assert compare(instr, a, b) == 1.0 - compare(instr, b, a)
            assert compare(instr, a, b) in (0.0, 0.5, 1.0)


# ---------------------------------------------------------------- build pieces


def test_tokenizer_training_is_deterministic_and_round_trips():
    texts = [format_prompt(r["prompt"]) + format_response(r["response"]) for r in task.sft_records(300, 0)]
    a, b = train_tokenizer(texts, 400), train_tokenizer(texts, 400)
    assert a.get_vocab() == b.get_vocab()
    assert a.pad_token_id == a.eos_token_id == a.bos_token_id
    for text in texts[:20]:
        assert a.decode(a(text, add_special_tokens=False)["input_ids"]) == text


def test_collate_sft_labels_only_response_and_eos():
    batch = collate_sft([([5, 6, 7, 8, 0], 3), ([5, 9, 0], 2)], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 0], [5, 9, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, x, x, 8, 0], [x, x, 0, x, x]]


def test_sft_loss_is_mean_token_nll_over_labelled_positions():
    tokenizer = train_tokenizer(["### Human: hi\n\n### Assistant: ok"] * 4, 300)
    cfg = BuildSettings(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    model = make_model(cfg, tokenizer).eval()
    batch = collate_sft([([3, 4, 5, 6, 0], 2), ([7, 8, 0], 1)], pad_id=0)
    with torch.no_grad():
        loss = sft_loss(model, batch).item()
        terms = []
        for ids, n_prompt in ([3, 4, 5, 6, 0], 2), ([7, 8, 0], 1):
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            terms += [-logp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids))]
    assert loss == pytest.approx(sum(terms) / len(terms), rel=1e-5)


# ---------------------------------------------------------------- shipped assets


@pytest.fixture(scope="module")
def shipped():
    if not (ASSETS / "config.json").is_file():
        pytest.skip("demo assets not built (python -m dpo.demo.build)")
    tokenizer = AutoTokenizer.from_pretrained(ASSETS)
    model = AutoModelForCausalLM.from_pretrained(ASSETS).eval()
    return tokenizer, model


def test_asset_directory_is_small():
    files = [p for p in Path(ASSETS).rglob("*") if p.is_file()]
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= {p.name for p in files}
    assert sum(p.stat().st_size for p in files) < MAX_ASSET_BYTES


def test_shipped_tokenizer(shipped):
    tokenizer, _ = shipped
    assert tokenizer.eos_token == "<|endoftext|>"
    assert tokenizer.pad_token_id == tokenizer.eos_token_id == tokenizer.bos_token_id
    assert 256 < len(tokenizer) <= 1024
    for instr in task.held_out_instructions(20, seed=0):
        prompt, response = format_prompt(instr.text), format_response(task.rambling_answer(instr, random.Random(0)))
        ids = tokenizer(prompt + response, add_special_tokens=False)["input_ids"]
        assert tokenizer.decode(ids) == prompt + response
        # The prompt/response boundary is a token boundary, so ids can be built by concatenation.
        assert ids == (tokenizer(prompt, add_special_tokens=False)["input_ids"]
                       + tokenizer(response, add_special_tokens=False)["input_ids"])
        assert tokenizer(prompt)["input_ids"] == tokenizer(prompt, add_special_tokens=False)["input_ids"]


def test_shipped_model_config(shipped):
    tokenizer, model = shipped
    config = model.config
    assert isinstance(config, PhiConfig)
    expected = BuildSettings()
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads, config.intermediate_size) == (
        expected.hidden_size, expected.num_hidden_layers, expected.num_attention_heads, expected.intermediate_size)
    assert config.rope_parameters["partial_rotary_factor"] == pytest.approx(0.4)
    assert config.vocab_size == len(tokenizer)
    assert config.eos_token_id == config.bos_token_id == config.pad_token_id == tokenizer.eos_token_id
    assert config.resid_pdrop == config.embd_pdrop == config.attention_dropout == 0.0
    assert model.dtype == torch.float32
    assert 0.5e6 < sum(p.numel() for p in model.parameters()) < 1.1e6
    gen = model.generation_config
    assert gen.do_sample and gen.temperature == pytest.approx(0.7) and gen.top_p == pytest.approx(0.9)
    assert gen.eos_token_id == gen.pad_token_id == tokenizer.eos_token_id


def test_shipped_model_knows_the_facts_on_held_out_prompts(shipped):
    """Greedy decoding starts with the right answer: the SFT model learned the task, not just the format."""
    tokenizer, model = shipped
    instrs = task.held_out_instructions(40, seed=5)
    tokenizer.padding_side = "left"
    enc = tokenizer([format_prompt(i.text) for i in instrs], return_tensors="pt", padding=True)
    tokenizer.padding_side = "right"
    with torch.no_grad():
        out = model.generate(**enc, do_sample=False, max_new_tokens=8)
    answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    correct = sum(judge(i, a).correct for i, a in zip(instrs, answers))
    assert correct >= 0.9 * len(instrs), list(zip([i.text for i in instrs], answers))


@pytest.mark.slow
def test_demo_promise_dpo_beats_its_sft_reference_on_80_percent(tmp_path):
    """`python train.py` then `python -m dpo.evaluate --model <run>/final`, exactly as the README says, end to end:
    the DPO policy must win at least 80% of the held-out comparisons against the SFT model (ties half), as the
    run's own logged win rate foretold, with no health alert."""
    import json
    import subprocess
    import sys

    if not (ASSETS / "config.json").is_file():
        pytest.skip("demo assets not built (python -m dpo.demo.build)")
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = tmp_path / "demo"
    subprocess.run([sys.executable, "train.py", "--output-dir", str(run)], cwd=root, env=env, check=True,
                   capture_output=True, text=True)
    done = subprocess.run([sys.executable, "-m", "dpo.evaluate", "--model", str(run / "final"), "--no-progress"],
                          cwd=root, env=env, check=True, capture_output=True, text=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["n"] == len(task.instructions("test"))
    assert result["win_rate"] >= 0.80, done.stdout
    assert result["policy_mean_score"] > result["reference_mean_score"] + 0.25
    # the win rate the run logged while training (--eval-generate, on by default for the demo) rises, and its last
    # value is within noise of the evaluation of final/: each inside the other's 95% interval
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in rates] == [10, 20, 30, 40, 50, 60, 64]
    assert rates[0]["generate/win_rate"] < 0.75 < rates[-1]["generate/win_rate"]
    last = rates[-1]
    assert last["generate/win_rate_low"] <= result["win_rate"] <= last["generate/win_rate_high"]
    assert result["ci_low"] <= last["generate/win_rate"] <= result["ci_high"]
    assert not [r for r in records if r["split"] == "alert"]  # a healthy run raises no health alert

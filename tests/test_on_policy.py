"""Online and iterative DPO: an online step equals an offline step on the same pairs, sampling is deterministic,
ties are skipped and counted, resume is exact mid-round, DDP equals one process for the same samples, and judges
that misbehave are one clear line."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dpo import on_policy
from dpo.train_settings import ConfigError, parse_settings
from dpo.judges import JudgeError, build_judge, check_scores
from dpo.modeling import load_causal_lm
from dpo.on_policy import OnPolicySettings, Sampler, summarize
from harness import make_model_dir, run_metrics, tiny_run_args, tiny_tokenizer, torchrun, train_tiny

PROMPTS = ["what color is the sun?", "tell me about the moon", "is the cat big?", "what is a dog?",
           "one two three", "the blue cat", "what is fast?", "please tell me a small answer"]
FIXED = ["yes", "the red cat", "no no", "a big slow green dog"]  # lengths 3, 11, 5, 20: never a tie

JUDGES = '''
def shorter(prompts, responses):
    return [[-float(len(r)) for r in rs] for prompts_row, rs in zip(prompts, responses)]


def constant(prompts, responses):
    return [[1.0 for r in rs] for rs in responses]


def raises(prompts, responses):
    raise ValueError("the judge server is down")


def wrong_shape(prompts, responses):
    return [[0.0, 1.0]]


def not_finite(prompts, responses):
    return [[float("nan")] * len(rs) for rs in responses]


def first_prompt_only(prompts, responses):
    """Every prompt ties but the first of each call (sampling group): one pair per group."""
    return [[float(i == 0 and j == 0) for j in range(len(rs))] for i, rs in enumerate(responses)]
'''


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    make_model_dir(root / "model")
    (root / "judges.py").write_text(JUDGES)
    eval_records = [{"prompt": "the sun", "chosen": "yes", "rejected": "no no no"}] * 4
    prompts_dir = root / "prompts"
    prompts_dir.mkdir()
    (prompts_dir / "train.jsonl").write_text("".join(
        json.dumps({"prompt": p, "chosen": "yes", "rejected": "no"}) + "\n" for p in PROMPTS))
    (prompts_dir / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in eval_records))
    pairs_dir = root / "pairs"  # the pairs the judge makes of FIXED: shortest chosen, longest rejected
    pairs_dir.mkdir()
    (pairs_dir / "train.jsonl").write_text("".join(
        json.dumps({"prompt": p, "chosen": "yes", "rejected": "a big slow green dog"}) + "\n" for p in PROMPTS))
    shutil.copy(prompts_dir / "test.jsonl", pairs_dir / "test.jsonl")
    return root


RUN = ("--micro-batch-size", "4", "--lr", "1e-3", "--warmup-ratio", "0")  # a dataset folder: its own test split


def run(workdir, out, *extra, dataset="prompts"):
    return train_tiny(workdir, out, "--batch-size", "8", *RUN, *extra, dataset=dataset, test_size=None)


def weights(out_dir):
    return load_file(out_dir / "final" / "model.safetensors")


def fixed_samples(monkeypatch):
    monkeypatch.setattr(Sampler, "sample", lambda self, model, prompts, position, group=0: (
        [list(FIXED) for _ in prompts], [[False] * len(FIXED) for _ in prompts],  # every sample ended
        [[None] * len(FIXED) for _ in prompts]))  # texts alone: tokenized as the offline pairs are


@pytest.mark.slow
def test_an_online_step_on_fixed_samples_equals_an_offline_step_on_the_same_pairs(workdir, monkeypatch):
    fixed_samples(monkeypatch)
    judge = f"{workdir / 'judges.py'}:shorter"
    live = run(workdir, "online", "--online", "--judge", judge, "--max-steps", "1")
    offline = run(workdir, "offline", "--max-steps", "1", "--no-precompute-ref", dataset="pairs")
    a, b = weights(live), weights(offline)
    initial = load_file(workdir / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], initial[k]) for k in a)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0)
    record = run_metrics(live)[0]
    assert record["online/pairs"] == 8 and record["online/ties"] == 0.0
    assert record["online/score"] == -sum(len(r) for r in FIXED) / len(FIXED)
    assert record["loss"] == pytest.approx(run_metrics(offline)[0]["loss"], abs=1e-7)


@pytest.mark.slow
def test_sampling_is_deterministic_for_a_seed(workdir):
    model = load_causal_lm(str(workdir / "model"))
    lengths = dict(max_length=48, max_prompt_length=24, truncation_mode="keep_end", template="recipe")
    settings = OnPolicySettings(online=True, num_samples=3, sample_max_new_tokens=6)
    sampler = Sampler(settings, build_judge("demo"), tiny_tokenizer(), lengths, seed=0)
    first, cut, _ = sampler.sample(model, PROMPTS[:3], position=5)
    assert len(first) == 3 and all(len(r) == 3 for r in first)
    assert cut == [[True] * 3] * 3  # 6 new tokens of a random model: none reaches its EOS
    assert sampler.sample(model, PROMPTS[:3], position=5)[0] == first
    assert sampler.sample(model, PROMPTS[:3], position=6)[0] != first  # each step samples afresh
    other = Sampler(settings, build_judge("demo"), tiny_tokenizer(), lengths, seed=1)
    assert other.sample(model, PROMPTS[:3], position=5)[0] != first
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    sampler.sample(model, PROMPTS[:1], position=0)
    assert torch.equal(torch.rand(2), expected)  # the training RNG is untouched


def test_ties_are_skipped_and_counted(workdir, monkeypatch):
    lengths = dict(max_length=48, max_prompt_length=24, truncation_mode="keep_end", template="recipe")

    class HalfTies:
        name = "half"

        def score_batch(self, prompts, responses):
            return [[1.0, 1.0] if i % 2 else [2.0, 1.0] for i in range(len(prompts))]

    sampler = Sampler(OnPolicySettings(online=True, num_samples=2), HalfTies(), tiny_tokenizer(), lengths, 0)
    pairs, stats = sampler.pairs(PROMPTS[:4], [["yes", "no"]] * 4, rows=[10, 11, 12, 13])
    assert [p.row for p in pairs] == [10, 12] and stats["ties"] == 2 and stats["pairs"] == 2
    metrics = summarize([stats, stats], seconds=1.5)
    assert metrics["online/ties"] == 0.5 and metrics["online/pairs"] == 4 and metrics["online/sample_s"] == 1.5
    fixed_samples(monkeypatch)  # in a run: when every prompt ties the step has nothing to learn: skipped, counted
    out = run(workdir, "all-ties", "--online", "--judge", f"{workdir / 'judges.py'}:constant", "--max-steps", "2")
    records = run_metrics(out, "train")
    assert [(r["online/ties"], r["online/pairs"], r["skipped_steps"], "loss" in r) for r in records] == [
        (1.0, 0, 1, False), (1.0, 0, 2, False)]
    assert not any("online/chosen_length" in r for r in records)  # no pair: no length logged (not 0)
    assert "online/chosen_length" in metrics
    assert all(torch.equal(v, load_file(workdir / "model" / "model.safetensors")[k]) for k, v in weights(out).items())
    assert not run_metrics(out, "alert")


class ScoreBy:
    """A judge whose score of an answer is `score(answer)`."""
    name = "score_by"

    def __init__(self, score):
        self.score = score

    def score_batch(self, prompts, responses):
        return [[self.score(r) for r in rs] for rs in responses]


@pytest.mark.parametrize("choice", ["first", "longest", "matched"])
def test_an_empty_sample_is_a_response_of_eos_alone(choice):
    """The policy stopping at once is an answer it gave: as the worst it is rejected as EOS alone (--pair-choice
    longest takes the shortest worst answer, so it always took this one and lost the pair)."""
    tokenizer = tiny_tokenizer()
    lengths = dict(max_length=48, max_prompt_length=24, truncation_mode="keep_end", template="recipe")
    sampler = Sampler(OnPolicySettings(online=True, num_samples=4, pair_choice=choice),
                      ScoreBy(lambda r: float(r.startswith("red"))), tokenizer, lengths, 0)
    pairs, stats = sampler.pairs(PROMPTS[:1], [["red green blue", "blue cat dog", "", "no"]], rows=[0])
    assert stats["pairs"] == 1 and stats["unusable"] == 0
    assert pairs[0].chosen_ids == tokenizer(" red green blue", add_special_tokens=False)["input_ids"] + [
        tokenizer.eos_token_id]
    if choice == "longest":
        assert pairs[0].rejected_ids == [tokenizer.eos_token_id]


def test_a_pair_trains_the_ids_the_policy_sampled():
    """A policy that sampled " y" "e" "l" "low" is trained on those ids, not on " yellow" tokenized again (" y" "el"
    "low"): what the reference and the loss score is what was sampled. The end (EOS) is added where the sample ended,
    not where it was cut; --max-length cuts it as a tokenized response; a sample with no ids is tokenized; the
    sampled ids are the tokens counted."""
    tokenizer = tiny_tokenizer()
    eos = tokenizer.eos_token_id
    odd, no = [281, 69, 76, 285], tokenizer(" no", add_special_tokens=False)["input_ids"]
    lengths = dict(max_length=48, max_prompt_length=24, truncation_mode="keep_end", template="recipe")
    longer = ScoreBy(lambda r: float(len(r)))
    sampler = Sampler(OnPolicySettings(online=True, num_samples=2), longer, tokenizer, lengths, 0)
    for cut, want in (([False, False], (odd + [eos], no + [eos])), ([True, True], (odd, no))):
        [pair], stats = sampler.pairs(PROMPTS[:1], [["yellow", "no"]], [0], [cut], [[odd, no]])
        assert (pair.chosen_ids, pair.rejected_ids) == want
        assert stats["tokens"] == len(odd) + len(no)
    [pair], _ = sampler.pairs(PROMPTS[:1], [["yellow", "no"]], [0], [[False, False]], [[None, no]])
    assert pair.chosen_ids == tokenizer(" yellow", add_special_tokens=False)["input_ids"] + [eos]
    room = len(pair.prompt_ids) + 2
    short = Sampler(OnPolicySettings(online=True, num_samples=2), longer, tokenizer, dict(lengths, max_length=room), 0)
    [pair], _ = short.pairs(PROMPTS[:1], [["yellow", "no"]], [0], [[False, False]], [[odd, no]])
    assert (pair.chosen_ids, pair.rejected_ids) == (odd[:2], (no + [eos])[:2])


def test_a_cut_sample_and_an_ended_one_of_the_same_text_differ_by_their_end():
    """ "yes" that ended and "yes" + a whitespace loop cut at the token budget (stripped to "yes"): with
    --missing-eos-penalty the ended one wins, and the pair is [yes, EOS] against [yes], not an identical pair."""
    tokenizer = tiny_tokenizer()
    lengths = dict(max_length=48, max_prompt_length=24, truncation_mode="keep_end", template="recipe")
    sampler = Sampler(OnPolicySettings(online=True, num_samples=2, missing_eos_penalty=0.5),
                      ScoreBy(lambda r: 1.0), tokenizer, lengths, 0)
    yes = tokenizer(" yes", add_special_tokens=False)["input_ids"]
    pairs, stats = sampler.pairs(PROMPTS[:1], [["yes", "yes"]], [0], [[False, True]])
    assert stats["pairs"] == 1 and (pairs[0].chosen_ids, pairs[0].rejected_ids) == (yes + [tokenizer.eos_token_id],
                                                                                    yes)
    # the same tokens on both sides, or an answer of no tokens at all (cut, all whitespace), teach nothing
    tie_break = ScoreBy(lambda r: float(len(r)))
    for answers, cut in ((["yes", "yes "], [False, False]), (["yes", ""], [False, True])):
        sampler = Sampler(OnPolicySettings(online=True, num_samples=2), tie_break, tokenizer, lengths, 0)
        pairs, stats = sampler.pairs(PROMPTS[:1], [answers], [0], [cut])
        assert (stats["pairs"], stats["unusable"]) == (0, 1), answers


@pytest.mark.parametrize("name,message", [
    ("raises", r"judge .*judges.py:raises raised ValueError: the judge server is down"),
    ("wrong_shape", r"judge .*:wrong_shape returned 1 score lists for [28] prompts"),
    ("not_finite", r"judge .*:not_finite: the scores of the responses to '[^']+' are not all finite "
                   r"\(\[nan(, nan)+\]\)"),
])
def test_a_judge_that_raises_or_returns_the_wrong_shape_is_one_line(workdir, monkeypatch, name, message):
    judge = build_judge(f"{workdir / 'judges.py'}:{name}")
    with pytest.raises(JudgeError, match=message) as error:
        judge.score_batch(PROMPTS[:2], [["a", "b"], ["c", "d"]])
    assert "\n" not in str(error.value)
    if name == "not_finite":  # the prompt is named by its text
        assert f"to {PROMPTS[0]!r} are" in str(error.value)
    fixed_samples(monkeypatch)
    with pytest.raises(JudgeError, match=message):
        run(workdir, f"judge-{name}", "--online", "--judge", f"{workdir / 'judges.py'}:{name}", "--max-steps", "1")


def test_a_judge_s_bad_scores_name_the_prompt_by_its_text():
    long = "a prompt " * 20
    cases = [([[1.0]], "to 'tell me about the moon' are 1 for 2 responses"),
             ([["high", 0.0]], "to 'tell me about the moon' are not numbers (['high', 0.0])"),
             ([[1.0, float("inf")]], "to 'tell me about the moon' are not all finite ([1.0, inf])")]
    for row, message in cases:
        with pytest.raises(JudgeError) as error:
            check_scores("j", [[0.0, 1.0], *row], ["what color is the sun?", "tell me about the moon"],
                         [["a", "b"], ["c", "d"]])
        assert str(error.value) == f"judge j: the scores of the responses {message}"
    with pytest.raises(JudgeError, match=f"to {long[:60]!r}... are 1 for 2"):
        check_scores("j", [[1.0]], [long], [["a", "b"]])


def test_bad_online_settings_are_one_line(workdir):
    with pytest.raises(ConfigError, match="--online and --iterations exclude each other"):
        parse_settings(["--online", "--iterations", "2"])
    with pytest.raises(ConfigError, match="--reference-update needs --iterations"):
        parse_settings(["--reference-update"])
    with pytest.raises(ConfigError, match="--num-samples must be at least 2"):
        parse_settings(["--online", "--num-samples", "1"])
    with pytest.raises(ConfigError, match="do not run under --fsdp"):
        parse_settings(["--online", "--fsdp"])
    with pytest.raises(JudgeError, match="no such file"):
        build_judge("nowhere/judges.py:shorter")


@pytest.mark.slow
@pytest.mark.parametrize("mode", [("--online",), ("--iterations", "2"), ("--iterations", "2", "--reference-update")])
def test_a_killed_run_resumes_where_it_stopped_sampling_included(workdir, mode):
    flags = (*mode, "--judge", f"{workdir / 'judges.py'}:shorter", "--num-samples", "3", "--sample-max-new-tokens",
             "6", "--max-steps", "4", "--save-steps", "1", "--sample-temperature", "1.0")
    name = "-".join(m.strip("-") for m in mode)
    whole = run(workdir, f"whole-{name}", *flags)
    split = run(workdir, f"split-{name}", *flags, "--stop-at-step", "3")  # inside round 2 for --iterations 2
    assert not (split / "final").exists()
    run(workdir, f"split-{name}", *flags, "--resume")
    a, b = weights(whole), weights(split)
    assert all(torch.equal(a[k], b[k]) for k in a)
    keep = ("loss", "online/score", "online/pairs", "online/round")
    ra = [{k: r.get(k) for k in keep} for r in run_metrics(whole, "train")]
    rb = [{k: r.get(k) for k in keep} for r in run_metrics(split, "train")]
    assert ra == rb
    if "--iterations" in mode:
        assert sorted(p.name for p in (whole / "rounds").iterdir()) == ["round-1.pt", "round-2.pt"]
        assert [r["online/round"] for r in ra] == [1, 1, 2, 2]
        assert ra[0]["online/score"] is not None and ra[1]["online/score"] is None  # sampled once per round


@pytest.mark.distributed
def test_ddp_two_processes_equal_one_for_the_same_samples(workdir):
    """Iterative DPO under torchrun: given the same round of samples (copied from a one-process run), two
    processes train to the same weights."""
    flags = ["--iterations", "1", "--judge", f"{workdir / 'judges.py'}:shorter", "--num-samples", "3",
             "--sample-max-new-tokens", "6", "--max-steps", "2", "--sample-temperature", "1.0"]
    single = run(workdir, "ddp-single", *flags)
    ddp = workdir / "ddp-two"
    (ddp / "rounds").mkdir(parents=True)
    shutil.copy(single / "rounds" / "round-1.pt", ddp / "rounds" / "round-1.pt")
    torchrun(tiny_run_args(workdir, ddp, "--batch-size", "8", *RUN, "--resume", *flags, dataset="prompts",
                           test_size=None))
    a, b = weights(single), weights(ddp)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)


@pytest.mark.slow
def test_online_under_lora_samples_with_the_adapters_and_scores_the_reference_with_them_off(workdir):
    out = run(workdir, "online-lora", "--online", "--lora-r", "4", "--judge", f"{workdir / 'judges.py'}:shorter",
              "--num-samples", "3", "--sample-max-new-tokens", "6", "--max-steps", "2", "--sample-temperature", "1.0")
    records = run_metrics(out, "train")
    assert len(records) == 2 and records[0]["online/pairs"] > 0  # the step-0 check passed: reference = adapters off
    assert records[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # policy == reference at step 0
    assert records[0]["online/train_s"] > 0 and records[0]["online/sample_s"] > 0
    assert (out / "final" / "adapter_config.json").is_file()


@pytest.mark.distributed
@pytest.mark.parametrize("judge,batch", [("shorter", "32"), ("first_prompt_only", "16")])
def test_online_ddp_two_processes_equal_one(workdir, judge, batch):
    """Each sampling group has its own seed, so two processes sample what one does; with first_prompt_only a step
    has a single pair, fewer than processes: the idle process joins the reductions with a zero-weight pass."""
    many = workdir / "many"
    if not many.exists():
        many.mkdir()
        words = ["red", "green", "blue", "cat", "dog", "sun", "moon", "big"]
        prompts = [f"what is the {a} {b}?" for a in words for b in words[:4]][:32]
        (many / "train.jsonl").write_text("".join(
            json.dumps({"prompt": p, "chosen": "yes", "rejected": "no"}) + "\n" for p in prompts))
        shutil.copy(workdir / "prompts" / "test.jsonl", many / "test.jsonl")
    flags = ("--online", "--judge", f"{workdir / 'judges.py'}:{judge}", "--num-samples", "3", "--sample-max-new-tokens",
             "6", "--sample-temperature", "1.0", "--batch-size", batch, "--max-steps", "2")
    single = run(workdir, f"online-single-{judge}", *flags, dataset="many")
    ddp = workdir / f"online-ddp-{judge}"
    torchrun(tiny_run_args(workdir, ddp, *RUN, *flags, dataset="many", test_size=None))
    a, b = weights(single), weights(ddp)
    initial = load_file(workdir / "model" / "model.safetensors")
    moved = max((a[k] - initial[k]).abs().max().item() for k in a)
    assert moved > 0
    for key in a:
        # AdamW's step is scale-free: at an element whose gradient is at rounding level, the processes' other
        # summation order (and torchrun's one thread each) can move it by a part of the lr (seen: 1.25e-5 of 2e-3
        # under load); another sample or pair moves many elements by whole updates
        torch.testing.assert_close(a[key], b[key], atol=max(1e-5, moved / 20), rtol=0)
    ra = run_metrics(single, "train")
    rb = run_metrics(ddp, "train")
    assert [r["online/pairs"] for r in ra] == [r["online/pairs"] for r in rb]
    assert [r["online/score"] for r in ra] == [r["online/score"] for r in rb]
    if judge == "first_prompt_only":
        assert [r["online/pairs"] for r in ra] == [1, 1]


@pytest.mark.slow
def test_a_resumed_round_refuses_missing_or_foreign_samples(workdir):
    flags = ("--iterations", "2", "--judge", f"{workdir / 'judges.py'}:shorter", "--num-samples", "3",
             "--sample-max-new-tokens", "6", "--max-steps", "4", "--sample-temperature", "1.0")
    out = run(workdir, "rounds-check", *flags, "--stop-at-step", "1", "--save-steps", "1")
    saved = out / "rounds" / "round-1.pt"
    moved = out / "round-1.pt.kept"
    saved.rename(moved)
    with pytest.raises(on_policy.DataError, match=r"--resume inside round 1, but .*round-1.pt is missing"):
        run(workdir, "rounds-check", *flags, "--resume")
    saved.write_bytes(moved.read_bytes()[:200])  # cut short (a disk that lost its tail)
    with pytest.raises(on_policy.DataError, match=r"^\S*round-1.pt cannot be read \(.*\); --overwrite to start afresh$"):
        run(workdir, "rounds-check", *flags, "--resume")
    moved.replace(saved)
    for checkpoint in out.glob("checkpoint-*"):  # no checkpoint to compare settings with: the round file is checked
        shutil.rmtree(checkpoint)
    with pytest.raises(on_policy.DataError, match="was sampled by a run with other settings"):
        run(workdir, "rounds-check", *flags[:-1], "0.9", "--resume", "--max-steps", "4")
    with pytest.raises(ConfigError, match="--iterations 2 needs at least one step per round"):
        run(workdir, "rounds-short", "--iterations", "2", "--max-steps", "1", "--judge", flags[3])
    with pytest.raises(JudgeError, match="the demo judge only knows the demo's instructions"):  # before any model
        run(workdir, "demo-judge", "--online", "--max-steps", "1")



@pytest.mark.slow
def test_a_round_file_that_cannot_be_synced_is_one_line_and_leaves_nothing(workdir, monkeypatch):
    """The round's samples are written whole and synced to disk before its first step (a power cut cannot leave a
    part of one for --resume): a full disk that shows only at the sync (NFS, a quota) is one line naming the file."""
    import errno

    import dpo.files

    real_fsync = os.fsync

    def fsync(fd):
        if "round-1.pt" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_fsync(fd)

    monkeypatch.setattr(dpo.files.os, "fsync", fsync)
    flags = ("--iterations", "2", "--judge", f"{workdir / 'judges.py'}:shorter", "--num-samples", "2",
             "--sample-max-new-tokens", "4", "--max-steps", "2")
    with pytest.raises(on_policy.DataError, match=r"^\S*rounds/round-1.pt cannot be written \(\[Errno 28\] No space "
                                                  r"left on device\)$"):
        run(workdir, "rounds-full", *flags)
    assert os.listdir(workdir / "rounds-full" / "rounds") == []


@pytest.mark.slow
def test_resume_refuses_other_instructions_to_sample(workdir, capsys):
    """Online DPO trains on no pairs of the dataset: --resume checks the instructions it samples, and their records,
    instead."""
    import train

    data = workdir / "prompts-resume"
    shutil.copytree(workdir / "prompts", data)
    flags = ("--online", "--judge", f"{workdir / 'judges.py'}:shorter", "--num-samples", "2",
             "--sample-max-new-tokens", "4", "--max-steps", "2", "--save-steps", "1")
    out = run(workdir, "resume-instructions", *flags, "--stop-at-step", "1", dataset=data.name)
    lines = (data / "train.jsonl").read_text().splitlines(keepends=True)
    (data / "train.jsonl").write_text("".join(lines[:-1]) + lines[-1].replace("small answer", "long answer"))
    argv = tiny_run_args(workdir, out, "--batch-size", "8", *RUN, *flags, "--resume", dataset=data.name,
                         test_size=None)
    assert train.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the training instructions are not the ones the run started on (8 "
                          "instructions now, 8 then") and err.count("\n") == 1
    changed = json.loads(lines[0])
    changed["chosen"] = "another field of the record"  # a judge may read it (IFEval reads its constraints)
    (data / "train.jsonl").write_text("".join([json.dumps(changed) + "\n", *lines[1:]]))
    assert train.cli(argv) == 2 and "(8 instructions now, 8 then" in capsys.readouterr().err
    (data / "train.jsonl").write_text("".join(lines))
    # a checkpoint of a version that built pairs from the sampled text (none recorded: 1): its later steps would differ
    state_file = out / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["data"]["pair_building"] == on_policy.PAIR_BUILDING == 2
    state_file.write_text(json.dumps({**state, "data": {k: v for k, v in state["data"].items()
                                                        if k != "pair_building"}}))
    assert train.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the checkpoint's run built its pairs from the samples as an earlier "
                          "version of this library did (pair building 1, now 2") and err.count("\n") == 1
    state_file.write_text(json.dumps(state))
    assert train.cli(argv) == 0 and (out / "final").is_dir()


@pytest.mark.parametrize("spec, meant", [("ifevl", "ifeval"), ("IFEval", "ifeval"), ("demoo", "demo"),
                                         ("ifeval-no-ech", "ifeval-no-echo")])
def test_a_misspelled_judge_is_named_as_such_not_looked_up_as_a_reward_model(spec, meant, monkeypatch):
    def no_lookup(*args, **kwargs):
        raise AssertionError("a misspelled judge name was loaded as a reward model")
    monkeypatch.setattr("dpo.judges.RewardModelJudge", no_lookup)
    with pytest.raises(JudgeError, match=f"unknown judge '{spec}': did you mean {meant}\\?"):
        build_judge(spec)


def test_a_judge_function_of_the_wrong_signature_is_one_line_when_it_is_loaded(tmp_path):
    """Called as fn(prompts, responses): one that cannot take both fails when --judge is read, not after sampling."""
    (tmp_path / "judge.py").write_text("def score(prompts):\n    return []\n")
    with pytest.raises(JudgeError, match=r"it is called as score\(prompts, responses\), which its signature does "
                                         r"not take"):
        build_judge(f"{tmp_path / 'judge.py'}:score")

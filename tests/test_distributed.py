"""torchrun on CPU (gloo, 2 processes): the same weights as one process with the same effective batch."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from harness import make_run_dir, run_metrics, tiny_run_args, torchrun

TRAIN_PAIRS = 72


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = make_run_dir(tmp_path_factory.mktemp("dist"), TRAIN_PAIRS + 10)
    args = tiny_run_args(root, None, "--lr", "1e-3", "--batch-size", "16", "--micro-batch-size", "4", "--max-steps",
                         "4", "--eval-steps", "2", "--max-eval-pairs", "10", "--layout", "padded",
                         "--weight-decay", "0.1",  # two parameter groups, which a sharded checkpoint keeps by name
                         test_size="10")  # 3 eval micro-batches: uneven over 2 processes
    assert train.main(args + ["--output-dir", str(root / "single")]) == 0
    return root, args


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    """The full model, or under LoRA the adapter."""
    adapter = run / "final" / "adapter_model.safetensors"
    return load_file(adapter if adapter.is_file() else run / "final" / "model.safetensors")


def assert_same_run(a: Path, b: Path):
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0)
    ma, mb = (run_metrics(run, "train", "eval") for run in (a, b))
    assert [(r["split"], r["step"]) for r in ma] == [(r["split"], r["step"]) for r in mb]
    for ra, rb in zip(ma, mb):
        for key in ("loss", "rewards/accuracies", "rewards/margins", "logps/chosen", "logits/chosen",
                    "logits/rejected", "entropy", "mean_token_accuracy"):
            if key == "rewards/accuracies" and max(abs(ra["rewards/chosen"]), abs(ra["rewards/rejected"])) < 1e-5:
                # policy == reference (warm-up step at lr 0): each reward is fp32 rounding noise of a
                # reference computed in other batch shapes, and its sign is not a property of the run
                continue
            assert ra[key] == pytest.approx(rb[key], abs=1e-5), (ra["step"], key)
    assert [r.get("pairs") for r in ma if r["split"] == "eval"] == [10, 10]  # eval shards reduced over ranks


@pytest.mark.distributed
def test_ddp_two_processes_match_one(setup):
    """Also with TensorBoard and --eval-generate on: only the main process logs and samples (the others wait),
    and neither changes the training."""
    root, args = setup
    (root / "prompts.jsonl").write_text('{"instruction": "what color is the sun?"}\n{"instruction": "a cat"}\n')
    torchrun(args + ["--output-dir", str(root / "ddp"), "--report-to", "tensorboard", "--eval-generate", "2",
                     "--eval-prompts", str(root / "prompts.jsonl"), "--eval-judge", f"implicit:{root / 'single'}",
                     "--eval-max-new-tokens", "4"])
    assert_same_run(root / "single", root / "ddp")
    # the reference pass is shared: each process scored half of the pairs; gathered, they equal one process's
    caches = {run: sorted((root / run / "reference_cache").glob("*.pt")) for run in ("single", "ddp")}
    assert [f.name for f in caches["single"]] == [f.name for f in caches["ddp"]] and len(caches["ddp"]) == 2
    for one, two in zip(caches["single"], caches["ddp"]):
        a, b = torch.load(one, weights_only=True), torch.load(two, weights_only=True)
        for key in ("chosen", "rejected"):
            torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    # only rank 0 writes: one line per step, no duplicates
    records = run_metrics(root / "ddp")
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2, 3, 4]
    assert [r["step"] for r in records if "generate/win_rate" in r] == [2, 4]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((root / "ddp" / "tensorboard").glob("events.out.tfevents.*"))
    assert len(events) == 1
    board = EventAccumulator(str(root / "ddp" / "tensorboard"), size_guidance={"scalars": 0})
    board.Reload()
    logged = [(e.step, e.value) for e in board.Scalars("train/loss")]
    assert logged == [(r["step"], pytest.approx(r["loss"], rel=1e-6)) for r in records if r["split"] == "train"]


@pytest.mark.distributed
def test_fsdp_checkpoint_resumes_at_another_world_size(setup):
    root, args = setup
    out = root / "fsdp"
    torchrun(args + ["--output-dir", str(out), "--fsdp", "--stop-at-step", "2"])
    assert (out / "checkpoint-2" / "model").is_dir() and not (out / "final").exists()
    assert train.main(args + ["--output-dir", str(out), "--resume"]) == 0  # 2 processes -> 1
    assert_same_run(root / "single", out)


@pytest.mark.distributed
@pytest.mark.parametrize("layout", ["packed", "shared_prompt"])
def test_ddp_with_packed_layouts_matches_one_padded_process(setup, layout):
    """Padding-free rows and shared prompts under DDP: the same weights and metrics as the single padded run."""
    root, args = setup
    torchrun(args + ["--output-dir", str(root / f"ddp-{layout}"), "--layout", layout])
    assert_same_run(root / "single", root / f"ddp-{layout}")


@pytest.mark.distributed
def test_ddp_stateful_loss_matches_one_process(setup):
    """bco_pair's running reward mean moves by whole global batches, all-reduced: 2 processes == 1."""
    root, args = setup
    bco = args + ["--loss", "bco_pair", "--save-steps", "3"]  # (step 1 is warm-up at lr 0)
    assert train.main(bco + ["--output-dir", str(root / "bco-single")]) == 0
    torchrun(bco + ["--output-dir", str(root / "bco-ddp")])
    assert_same_run(root / "bco-single", root / "bco-ddp")
    single, ddp = (torch.load(root / run / "checkpoint-3" / "extra.pt", weights_only=True)["loss_state"]["bco_pair"]
                   for run in ("bco-single", "bco-ddp"))
    assert single["steps"] == ddp["steps"] == 3 and abs(single["reward_mean"]) > 1e-3
    assert ddp["reward_mean"] == pytest.approx(single["reward_mean"], abs=1e-6)


@pytest.mark.distributed
def test_ddp_tr_dpo_matches_one_process(setup):
    """TR-DPO: every process moves its reference copy from the same policy, so 2 processes == 1, and the eval
    records (scored against the moved reference) too; the checkpoint keeps the reference once."""
    root, args = setup
    synced = args + ["--sync-ref-model", "--ref-model-sync-steps", "2", "--ref-model-mixup-alpha", "0.5",
                     "--save-steps", "3"]
    assert train.main(synced + ["--output-dir", str(root / "trdpo-single")]) == 0
    torchrun(synced + ["--output-dir", str(root / "trdpo-ddp")])
    assert_same_run(root / "trdpo-single", root / "trdpo-ddp")
    single, ddp = (load_file(root / run / "checkpoint-3" / "reference" / "model.safetensors")
                   for run in ("trdpo-single", "trdpo-ddp"))
    for key in single:
        torch.testing.assert_close(single[key], ddp[key], atol=1e-5, rtol=0)


@pytest.mark.distributed
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_lora_under_torchrun_matches_one_process(setup, sharding):
    """LoRA adapters trained by 2 processes (DDP, or FSDP2 stopped at step 2 and resumed in 1 process) equal one
    process's; checkpoints hold the adapter only, whatever the world size."""
    root, args = setup
    lora = args + ["--lora-r", "4", "--lr", "1e-2"]
    single = root / "lora-single"
    if not single.exists():
        assert train.main(lora + ["--output-dir", str(single)]) == 0
    out = root / f"lora-{sharding}"
    if sharding == "ddp":
        torchrun(lora + ["--output-dir", str(out)])
    else:
        torchrun(lora + ["--output-dir", str(out), "--fsdp", "--stop-at-step", "2"])
        assert (out / "checkpoint-2" / "model" / "adapter_model.safetensors").is_file()
        assert not (out / "checkpoint-2" / "model" / "model.safetensors").exists()
        assert train.main(lora + ["--output-dir", str(out), "--resume"]) == 0
    assert_same_run(single, out)
    assert all("lora_" in key for key in final_weights(out))


@pytest.mark.parametrize("device_type,backend", [("cuda", "nccl"), ("cpu", "gloo")])
def test_process_group_waits_for_a_long_reference_pass_and_binds_the_gpu(monkeypatch, device_type, backend):
    import datetime

    import torch.distributed as torch_dist

    from dpo import distributed

    calls = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch_dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch_dist, "init_process_group", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr(torch_dist, "get_rank", lambda: 1)
    monkeypatch.setattr(torch_dist, "get_world_size", lambda: 2)
    info = distributed.init_distributed(device_type)
    assert info == distributed.DistInfo(rank=1, world_size=2, local_rank=1)
    assert calls[0]["backend"] == backend and calls[0]["timeout"] >= datetime.timedelta(hours=1)
    assert calls[0]["device_id"] == (torch.device("cuda", 1) if device_type == "cuda" else None)


@pytest.mark.distributed
def test_fsdp_with_a_token_budget_matches_one_process(setup):
    """--max-tokens-per-micro-batch cuts each process's slice into its own number of micro-batches; the processes
    still run the same number of passes (FSDP's collectives need it: a short process adds weight-0 passes), and
    the run equals the single process's row micro-batches."""
    root, args = setup
    out = root / "fsdp-tokens"
    torchrun(args + ["--output-dir", str(out), "--fsdp", "--max-tokens-per-micro-batch", "180"])  # 6 and 5 passes
    assert_same_run(root / "single", out)


@pytest.mark.distributed
def test_fsdp_in_bf16_gathers_half_precision_and_matches_one_process(setup):
    """FSDP2 with a MixedPrecisionPolicy (bf16 gathers, fp32 gradient reduction) trains as one bf16 process does,
    to bf16 rounding, and its step-0 check passes against the reference computed before sharding."""
    root, args = setup
    assert train.main(args + ["--output-dir", str(root / "single-bf16"), "--precision", "bf16"]) == 0
    torchrun(args + ["--output-dir", str(root / "fsdp-bf16"), "--fsdp", "--precision", "bf16"])
    la, lb = ([r["loss"] for r in run_metrics(root / run, "train", "eval")]
              for run in ("single-bf16", "fsdp-bf16"))
    assert len(la) == len(lb) == 6 and lb == pytest.approx(la, abs=3e-4)  # measured: within 6e-5
    assert la[-1] < la[0] - 0.05
    wa, wb = final_weights(root / "single-bf16"), final_weights(root / "fsdp-bf16")
    for key in wa:  # Adam's sign-like updates turn bf16 rounding into differences of a few lr-sized steps
        torch.testing.assert_close(wa[key], wb[key], atol=5e-3, rtol=0)


def test_a_model_for_a_gpu_loads_straight_onto_it(monkeypatch):
    """Under torchrun every process loads the model: on a GPU the weights go from the file to the device (a device
    map), not through a full copy in host memory per process. On the CPU nothing changes."""
    import importlib.util

    from transformers import AutoModelForCausalLM

    from dpo.modeling import DEMO_MODEL_DIR, load_causal_lm, model_placement

    gpu = torch.device("cuda", 1)
    assert model_placement("cpu") == {}
    assert model_placement(gpu) == {"device_map": {"": gpu}}
    assert model_placement("cpu", quantization="q") == {"device_map": {"": torch.device("cpu")},
                                                        "quantization_config": "q"}
    # the placement is the one transformers takes: on the CPU it loads the same weights as the plain load
    placed = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR, device_map={"": torch.device("cpu")})
    plain = load_causal_lm("demo").state_dict()
    assert placed.state_dict().keys() == plain.keys()
    assert all(torch.equal(value, plain[key]) for key, value in placed.state_dict().items())
    # device maps need accelerate: without it the model loads on the host and moves, as before
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "accelerate" else find_spec(name, *a))
    assert model_placement(gpu) == {}


@pytest.mark.distributed
def test_ddp_resume_gives_each_process_its_own_random_state(setup):
    """LoRA dropout draws differ between the processes: a 2-process run stopped at step 2 and resumed in 2 processes
    equals the uninterrupted one bit for bit (each process resumes with its own RNG states, not the main one's)."""
    root, args = setup
    lora = args + ["--lora-r", "4", "--lr", "1e-2", "--lora-dropout", "0.2"]
    torchrun(lora + ["--output-dir", str(root / "dropout-straight")])
    torchrun(lora + ["--output-dir", str(root / "dropout-split"), "--stop-at-step", "2"])
    torchrun(lora + ["--output-dir", str(root / "dropout-split"), "--resume"])
    straight, split = final_weights(root / "dropout-straight"), final_weights(root / "dropout-split")
    assert straight.keys() == split.keys()
    for key in straight:
        assert torch.equal(straight[key], split[key]), key


def test_a_collective_that_fails_because_a_peer_stopped_is_told_apart():
    from torch.distributed import DistBackendError

    from dpo.distributed import peer_stopped

    gloo = ("[../third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer [127.0.0.1]:13704. This "
            "is typically caused by a remote worker crashing.")
    assert peer_stopped(RuntimeError(gloo)) and peer_stopped(DistBackendError("NCCL communicator was aborted"))
    assert not peer_stopped(RuntimeError("mat1 and mat2 shapes cannot be multiplied")) and not peer_stopped(
        ValueError("closed by peer"))
    assert not peer_stopped(DistBackendError("Watchdog caught collective operation timeout"))  # its own cause: kept


@pytest.mark.slow
def test_an_error_of_the_main_process_alone_is_one_line_and_the_others_say_why_they_stopped(setup, tmp_path):
    """The main process alone checks the output directory (and writes checkpoints and final/): its error is its one
    line, and the other processes, whose next collective fails, say in one line that they stopped with it (not a
    traceback of a broken connection)."""
    root, args = setup
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "notes.txt").write_text("not a run")
    result = torchrun(args + ["--output-dir", str(taken)], check=False)
    assert result.returncode != 0
    errors = sorted(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert errors == [f"error: --output-dir {taken} already holds files; pass --resume to continue that run or "
                      "--overwrite to replace it",
                      "error: process 1 stopped because another process did (its error is above)"], result.stderr
    assert "[rank1]" not in result.stderr and "Connection closed" not in result.stderr


@pytest.mark.slow
def test_a_judge_error_on_another_process_than_the_main_one_is_one_line_and_the_main_process_says_why_it_stopped(
        setup, tmp_path):
    """Online DPO: each process judges its own share of the samples, so a process other than the main one can stop
    with a judge's one-line error; the main process, whose gather then fails, says in one line that it stopped with
    it."""
    root, args = setup
    judge = tmp_path / "judge.py"
    judge.write_text("import os\n\ndef j(prompts, responses):\n    if os.environ['RANK'] == '1':\n"
                     "        raise RuntimeError('rank 1 judge failure')\n"
                     "    return [[float(len(r) % 3) for r in rows] for rows in responses]\n")
    result = torchrun(args + ["--output-dir", str(tmp_path / "online"), "--online", "--judge", f"{judge}:j",
                              "--num-samples", "2", "--sample-max-new-tokens", "4"], check=False)
    assert result.returncode != 0
    errors = sorted(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert errors == [f"error: judge {judge}:j raised RuntimeError: rank 1 judge failure",
                      "error: process 0 stopped because another process did (its error is above)"], result.stderr
    assert "[rank0]" not in result.stderr and "Connection closed" not in result.stderr

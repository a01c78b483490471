"""The training loop end to end on a tiny Phi model: accumulation, resume, fp16, outputs, presets, bad input."""

import functools
import gc
import json
import math
import os
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

import train
from dpo.checkpoint import load_checkpoint
from dpo.data import RENDERING, collate_pairs
from dpo.train_settings import ConfigError, parse_settings
from dpo.errors import UserError
from harness import make_run_dir, run_metrics, tiny_run_args, train_tiny

TIMING_KEYS = {"pairs_per_s", "tokens_per_s"}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return make_run_dir(tmp_path_factory.mktemp("train"), 80)


def run(workdir: Path, out: str, *extra: str) -> Path:
    return train_tiny(workdir, out, "--lr", "1e-3", *extra)


def final_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(out_dir / "final" / "model.safetensors")


def without_timing(records):
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in records]


@pytest.mark.slow
def test_accumulation_is_exact(workdir):
    """One step of micro 8 x accumulation 8 equals one step of micro 64."""
    common = ("--batch-size", "64", "--max-steps", "1", "--warmup-ratio", "0", "--max-eval-pairs", "4")
    accumulated = run(workdir, "acc8", *common, "--micro-batch-size", "8")
    whole = run(workdir, "acc1", *common, "--micro-batch-size", "64")
    a, b = final_weights(accumulated), final_weights(whole)
    initial = load_file(workdir / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], initial[k]) for k in a)  # the step did change the weights
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-5, rtol=0)
    ma, mb = run_metrics(accumulated)[0], run_metrics(whole)[0]
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-5)
    # token-weighted over the step, not a mean of micro means
    for key in ("logits/chosen", "logits/rejected", "entropy", "mean_token_accuracy"):
        assert ma[key] == pytest.approx(mb[key], rel=1e-5)
    config = json.loads((accumulated / "run_config.json").read_text())
    assert config["accumulation_steps"] == 8


def mapped_file(address: int) -> str | None:
    """The file whose memory mapping holds `address` (Linux: /proc/self/maps), or None."""
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(x, 16) for x in fields[0].split("-"))
        if low <= address < high:
            return fields[5] if len(fields) == 6 else None
    return None


@pytest.mark.slow
def test_resume_mid_run_is_identical(workdir):
    """6 steps straight == 3 steps, stop, --resume, 3 more: same weights and metrics (crossing an epoch)."""
    common = ("--batch-size", "16", "--micro-batch-size", "8", "--max-steps", "6", "--eval-steps", "2",
              "--max-eval-pairs", "8", "--loss", "sigmoid:0.7,bco_pair:0.3")
    straight = run(workdir, "straight", *common)
    split = run(workdir, "split", *common, "--stop-at-step", "3")
    assert not (split / "final").exists() and (split / "checkpoint-3").is_dir()
    optimizer = load_checkpoint(split / "checkpoint-3")["optimizer"]  # memory-mapped, not read whole into RAM
    moments = [t for s in optimizer["state"].values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    assert moments and all(mapped_file(t.data_ptr()) == str((split / "checkpoint-3" / "optimizer.pt").resolve())
                           for t in moments)
    run(workdir, "split", *common, "--resume")
    a, b = final_weights(straight), final_weights(split)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ma, mb = run_metrics(straight), run_metrics(split)
    assert [r["step"] for r in ma] == [r["step"] for r in mb]
    assert without_timing(ma) == without_timing(mb)
    assert max(r["epoch"] for r in ma) > 1.0  # 72 train pairs / 16 = 4 steps per epoch


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit"])
def test_weight_decay_reaches_matrices_and_embeddings_not_biases_or_norms(optimizer):
    """With zero gradients AdamW's step is its decay alone: p <- p (1 - lr wd) for the matrices, biases and norm
    scales untouched (as nanoGPT, HF Trainer and TRL)."""
    if optimizer == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    from dpo.optim import build_optimizer
    from harness import tiny_phi

    model = tiny_phi()
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    opt = build_optimizer(optimizer, model.parameters(), lr=0.5, betas=(0.9, 0.999), weight_decay=0.1, fused=False)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()
    matrices = {name for name, p in model.named_parameters() if p.ndim >= 2}
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.layers.0.mlp.fc1.weight"} <= matrices
    assert any("layernorm" in name or "norm" in name for name, p in model.named_parameters() if p.ndim == 1)
    for name, p in model.named_parameters():
        want = before[name] * (1 - 0.5 * 0.1) if name in matrices else before[name]
        torch.testing.assert_close(p.detach(), want, rtol=1e-6, atol=0, msg=name)


def test_a_checkpoint_that_decays_every_parameter_resumes_as_its_run_began(workdir, tmp_path, capsys):
    """A checkpoint written when weight decay reached biases and norms too (one parameter group) goes on so."""
    common = ("--max-steps", "4", "--weight-decay", "0.1", "--max-eval-pairs", "4")
    out = run(workdir, str(tmp_path / "r"), *common, "--stop-at-step", "2")
    groups = load_checkpoint(out / "checkpoint-2")["optimizer"]["param_groups"]
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(name.endswith("bias") or "norm" in name for name in groups[1]["params"])
    file = out / "checkpoint-2" / "optimizer.pt"
    state = torch.load(file, weights_only=True)
    state["param_groups"] = [{**state["param_groups"][0],
                              "params": [n for g in state["param_groups"] for n in g["params"]]}]
    torch.save(state, file)
    capsys.readouterr()
    run(workdir, str(tmp_path / "r"), *common, "--resume", "--stop-at-step", "3")
    assert "checkpoint-2 decays biases and norms as well" in capsys.readouterr().out
    resumed = load_checkpoint(out / "checkpoint-3")["optimizer"]["param_groups"]
    assert len(resumed) == 1 and resumed[0]["weight_decay"] == 0.1 and len(resumed[0]["params"]) == sum(
        len(g["params"]) for g in groups)


def test_a_resumed_optimizer_state_is_copied_out_of_the_checkpoint_file(workdir, tmp_path):
    """The checkpoint's optimizer.pt is memory-mapped; kept as the optimizer's state on the CPU, the file would stay
    mapped (its disk space held after the checkpoint rotates out) for the whole run."""
    out = run(workdir, str(tmp_path / "r"), "--max-steps", "4", "--stop-at-step", "2")
    cfg = parse_settings(tiny_run_args(workdir, out, "--lr", "1e-3", "--max-steps", "4", "--resume"))
    resume = load_checkpoint(out / "checkpoint-2")
    cpu = torch.device("cpu")
    policy, adapters = train.build_policy(cfg, cpu, weights=str(resume["model_dir"]))
    state = train.build_state(cfg, policy, adapters, device=cpu, dist=train.DistInfo(),
                              collate=lambda pairs: collate_pairs(pairs, pad_id=0), workspace_pairs=[], resume=resume)
    moments = [t for s in state.optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    file = str((out / "checkpoint-2" / "optimizer.pt").resolve())
    assert moments and all(mapped_file(t.data_ptr()) != file for t in moments)


def test_a_sigterm_at_the_last_step_lets_the_run_finish(workdir, tmp_path, monkeypatch, capsys):
    """Not a checkpoint of the last step with "continue with --resume", then final/ all the same (which --resume
    refuses as a finished run)."""
    import os
    import signal

    real = train.train_step

    def signalled_at_the_last(state, batch, lr):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(state, batch, lr)

    monkeypatch.setattr(train, "train_step", signalled_at_the_last)
    out = run(workdir, str(tmp_path / "r"), "--max-steps", "3", "--max-eval-pairs", "4", "--save-steps", "2")
    assert "continue with --resume" not in capsys.readouterr().out
    assert (out / "final").is_dir() and sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_aot_under_a_token_budget_resumes_in_the_layout_it_ran_in(workdir, tmp_path, capsys):
    """The budget counts the layout's tokens, so another layout puts other pairs in a micro-batch, and AOT sorts
    within it; --layout auto resolves by device and --compile, so the resolved layout is what the checkpoint keeps."""
    common = ("--loss", "aot", "--max-tokens-per-micro-batch", "60", "--max-steps", "3", "--batch-size", "8",
              "--max-eval-pairs", "4")
    out = run(workdir, str(tmp_path / "aot"), *common, "--layout", "shared_prompt", "--stop-at-step", "1")
    assert json.loads((out / "checkpoint-1" / "trainer_state.json").read_text())["layout"] == "shared_prompt"
    capsys.readouterr()
    assert train.cli(tiny_run_args(workdir, out, "--lr", "1e-3", *common, "--layout", "padded", "--resume")) == 2
    assert ("--resume: the run cut its micro-batches by the shared_prompt layout's tokens (--max-tokens-per-micro-batch "
            "with --loss aot), this one would use the padded layout; pass --layout shared_prompt") in \
        capsys.readouterr().err
    state_file = out / "checkpoint-1" / "trainer_state.json"  # as an earlier version wrote it: the layout as given
    state = json.loads(state_file.read_text())
    legacy = {key: value for key, value in state.items() if key != "layout"}
    state_file.write_text(json.dumps({**legacy, "settings": {**state["settings"], "layout": "shared_prompt"}}))
    assert train.cli(tiny_run_args(workdir, out, "--lr", "1e-3", *common, "--layout", "padded", "--resume")) == 2
    assert "by the shared_prompt layout's tokens" in capsys.readouterr().err
    state_file.write_text(json.dumps(state))
    run(workdir, str(tmp_path / "aot"), *common, "--layout", "shared_prompt", "--resume")
    assert (out / "final").is_dir()
    sigmoid = run(workdir, str(tmp_path / "sigmoid"), "--max-tokens-per-micro-batch", "60", "--max-steps", "3",
                  "--layout", "shared_prompt", "--stop-at-step", "1")  # exact whatever the split: any layout resumes
    run(workdir, str(tmp_path / "sigmoid"), "--max-tokens-per-micro-batch", "60", "--max-steps", "3", "--layout",
        "padded", "--resume")
    assert (sigmoid / "final").is_dir()


def test_steps_the_grad_scaler_skips_leave_the_schedule_where_it_was(workdir, tmp_path, monkeypatch):
    """As transformers' Trainer, which does not step its scheduler when the optimizer step was skipped: a scale of
    2^127 overflows at every step, so every step is skipped and the lr stays at the schedule's first value; also
    across a resume (the count is in the checkpoint)."""
    real = torch.amp.GradScaler
    monkeypatch.setattr(torch.amp, "GradScaler", lambda device: real(device, init_scale=2.0 ** 127))
    common = ("--precision", "fp16", "--max-steps", "4", "--warmup-ratio", "0", "--max-eval-pairs", "4")
    straight = run(workdir, str(tmp_path / "straight"), *common)
    records = run_metrics(straight, "train")
    assert [r["skipped_steps"] for r in records] == [1, 2, 3, 4]
    assert [r["lr"] for r in records] == [1e-3] * 4  # not the cosine decay of steps that never updated
    split = run(workdir, str(tmp_path / "split"), *common, "--stop-at-step", "2")
    assert json.loads((split / "checkpoint-2" / "trainer_state.json").read_text())["overflow_steps"] == 2
    run(workdir, str(tmp_path / "split"), *common, "--resume")
    assert [r["lr"] for r in run_metrics(split, "train")] == [1e-3] * 4


@pytest.mark.slow
def test_fp16_autocast_trains_with_fp32_master_weights(workdir):
    out = run(workdir, "fp16", "--precision", "fp16", "--batch-size", "8", "--micro-batch-size", "4",
              "--max-steps", "2", "--warmup-ratio", "0", "--max-eval-pairs", "4")
    records = run_metrics(out, "train")
    assert len(records) == 2
    # a NaN loss is written as null: the loss must be a finite number, near ln 2 at the first step
    assert all(r["loss_scale"] > 0 and isinstance(r["loss"], float) and math.isfinite(r["loss"]) for r in records)
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-3)
    weights = final_weights(out)
    assert all(w.dtype == torch.float32 for w in weights.values())
    initial = load_file(workdir / "model" / "model.safetensors")
    assert any(not torch.equal(weights[k], initial[k]) for k in weights)


def test_fp16_overflowing_step_is_skipped_without_touching_weights(workdir, monkeypatch):
    # a loss scale near fp32's maximum makes the scaled gradients overflow on the first step
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 127))
    out = run(workdir, "overflow", "--precision", "fp16", "--batch-size", "8", "--micro-batch-size", "8",
              "--max-steps", "1", "--warmup-ratio", "0", "--max-eval-pairs", "4")
    record = run_metrics(out, "train")[0]
    assert record["skipped_steps"] == 1
    assert record["loss_scale"] == 2.0 ** 126  # halved after the overflow
    initial = load_file(workdir / "model" / "model.safetensors")
    for key, value in final_weights(out).items():
        assert torch.equal(value, initial[key]), key


def test_a_finished_run_leaves_no_model_alive(workdir):
    """main frees its models, reference cycles included, before it returns: under torchrun the wrapped model holds
    the process group, which must not be left to the interpreter's shutdown. With the collector off, a cycle main
    left behind would stay."""
    gc.collect()
    before = {id(o) for o in gc.get_objects() if isinstance(o, transformers.PreTrainedModel)}
    gc.disable()
    try:
        run(workdir, "freed", "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "1")
        alive = [o for o in gc.get_objects() if isinstance(o, transformers.PreTrainedModel) and id(o) not in before]
    finally:
        gc.enable()
    assert alive == []


@pytest.mark.slow
def test_outputs_and_final_round_trip(workdir):
    out = run(workdir, "outputs", "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "3",
              "--save-steps", "1", "--save-total-limit", "2", "--eval-steps", "2", "--max-eval-pairs", "4", "--plot")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert (out / "training_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    records = run_metrics(out)
    train_keys = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                  "logps/chosen", "logps/rejected", "logps/chosen_per_token", "logps/rejected_per_token", "lr", "grad_norm", "pairs_per_s", "tokens_per_s", "epoch", "step"}
    assert train_keys <= set(records[0])
    assert [r["step"] for r in records if r["split"] == "eval"] == [2, 3]
    assert json.loads((out / "final" / "dpo_run.json").read_text())["reference_model"] == str(workdir / "model")
    # the card's decoding, top-k off (unset, transformers would fill in 50)
    config = json.loads((out / "final" / "generation_config.json").read_text())
    assert (config["do_sample"], config["temperature"], config["top_p"], config["top_k"]) == (True, 0.7, 0.9, 0)

    # the phi-2-dpo model card's own snippet, on final/ (device_map="auto" needs accelerate)
    pytest.importorskip("accelerate")
    import transformers
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(out / "final"), low_cpu_mem_usage=True, device_map="auto", trust_remote_code=True, dtype=torch.float16)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out / "final"))
    input_text = "### Human: what color is the sun?\n\n### Assistant:"
    outputs = model.generate(tokenizer(input_text, return_tensors="pt").to(model.device)["input_ids"], max_length=40,
                             temperature=0.7, top_p=0.9, do_sample=True, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(outputs[0], skip_special_tokens=True).startswith(input_text)
    # and the weights it loads are the trained ones
    trained = final_weights(out)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.float(), trained[name].to(torch.float16).float())


def test_phi2_preset_resolves_to_the_recipe():
    cfg = parse_settings(["--config", "configs/phi2_ultrafeedback.json"])
    expected = {"model": "lxuechen/phi-2-sft", "dataset": "HuggingFaceH4/ultrafeedback_binarized",
                "train_split": "train_prefs", "num_pairs": 10000, "template": "recipe", "loss": "sigmoid", "beta": 0.1,
                "lr": 3e-5, "warmup_ratio": 0.03, "epochs": 2, "batch_size": 64, "max_length": 1024,
                "precision": "fp16", "label_smoothing": 0.0, "reference_free": False, "min_lr_ratio": 0.0,
                "subset": "random", "seed": 42, "micro_batch_size": 4, "gradient_checkpointing": True,
                "eval_split": "test_prefs", "max_prompt_length": 512, "optimizer": "adamw", "weight_decay": 0.0}
    assert {k: cfg.to_dict()[k] for k in expected} == expected
    assert cfg.batch_size % cfg.micro_batch_size == 0


@pytest.mark.slow
def test_phi2_preset_trains_a_tiny_phi_on_the_ultrafeedback_schema(workdir, shared_dir):
    data = shared_dir / "data" / "alpacaeval-phi2-prefs" / "ultrafeedback_schema"
    out = workdir / "preset"
    argv = ["--config", "configs/phi2_ultrafeedback.json", "--model", str(workdir / "model"), "--dataset", str(data),
            "--output-dir", str(out), "--num-pairs", "16", "--batch-size", "8", "--micro-batch-size", "4",
            "--max-steps", "2", "--max-length", "64", "--max-prompt-length", "32", "--max-eval-pairs", "4",
            "--precision", "fp32", "--no-progress", "--no-plot"]
    assert train.main(argv) == 0
    records = run_metrics(out)
    assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
    # 4 held-out rows, minus those whose responses become identical once cut to 64 tokens
    assert records[-1]["split"] == "eval" and 1 <= records[-1]["pairs"] <= 4
    config = json.loads((out / "run_config.json").read_text())
    assert config["train_split"] == "train_prefs" and config["loss"] == "sigmoid" and config["beta"] == 0.1


@pytest.mark.parametrize("argv,message", [
    (["--loss", "nonexistent"], "nonexistent"),
    (["--model", "./no/such/model"], "does not exist"),
    (["--dataset", "missing.jsonl"], "file not found"),
    (["--batch-size", "10", "--micro-batch-size", "4"], "multiple"),
    (["--max-prompt-length", "64", "--max-length", "32"], "max-prompt-length"),
    (["--config", "no-such.json"], "no such file"),
])
def test_bad_input_is_one_clear_line(workdir, tmp_path, capsys, argv, message):
    base = ["--model", str(workdir / "model"), "--dataset", str(workdir / "pairs.jsonl"),
            "--output-dir", str(tmp_path / "out"), "--no-progress"]
    assert train.cli(base + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


def test_output_dir_is_never_reused_silently(workdir, tmp_path, capsys):
    as_file = tmp_path / "a-file"
    as_file.write_text("x")
    base = ["--model", str(workdir / "model"), "--dataset", str(workdir / "pairs.jsonl"), "--no-progress"]
    assert train.cli(base + ["--output-dir", str(as_file)]) == 2
    assert "is a file" in capsys.readouterr().err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "metrics.jsonl").write_text("{}\n")
    assert train.cli(base + ["--output-dir", str(busy)]) == 2
    assert "--resume" in capsys.readouterr().err and (busy / "metrics.jsonl").read_text() == "{}\n"


def test_overwrite_replaces_a_run_only_once_the_new_one_is_set_up(workdir, tmp_path, capsys):
    base = ["--model", str(workdir / "model"), "--dataset", str(workdir / "pairs.jsonl"), "--no-progress"]
    old = run(workdir, str(tmp_path / "old"), "--max-steps", "1")
    weights = (old / "final" / "model.safetensors").read_bytes()
    listing = sorted(p.name for p in old.iterdir())
    # a bad model, bad data, an input inside the run: the old run is still there, whole
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n')
    for extra in (["--model", str(tmp_path / "no-model")], ["--dataset", str(tmp_path / "bad.jsonl")],
                  ["--dataset", str(old / "metrics.jsonl")]):
        assert train.cli(base + extra + ["--output-dir", str(old), "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        assert sorted(p.name for p in old.iterdir()) == listing
        assert (old / "final" / "model.safetensors").read_bytes() == weights
    assert "it is inside --output-dir" in err
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".replaced")] == []
    # a directory that holds no run is never deleted
    other = tmp_path / "notes"
    other.mkdir()
    (other / "todo.txt").write_text("x")
    assert train.cli(base + ["--output-dir", str(other), "--overwrite"]) == 2
    assert "holds files but no run of train.py" in capsys.readouterr().err and (other / "todo.txt").exists()
    # nor the working directory (moved aside, the new run would write into the old one)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(old / "final")
        assert train.cli(base + ["--output-dir", str(old), "--overwrite"]) == 2
    assert "it holds the working directory" in capsys.readouterr().err and (old / "final").is_dir()
    # a good run replaces it, and nothing of the old one is left beside it
    assert train.cli(base + ["--output-dir", str(old), "--overwrite", "--max-steps", "2", "--lr", "1e-3"]) == 0
    assert json.loads((old / "run_config.json").read_text())["max_steps"] == 2
    assert (old / "final" / "model.safetensors").read_bytes() != weights
    assert [p.name for p in tmp_path.iterdir() if "replaced" in p.name] == []


def test_resume_refuses_a_model_whose_weights_changed(workdir, tmp_path, capsys):
    """The reference (and under LoRA the base) of a resumed run is --model: weights written again at its path would
    silently be another reference. A copy of the same files (new modification times) resumes."""
    import shutil

    from safetensors.torch import save_file

    from dpo.reference import identity_changes

    model = tmp_path / "model"
    shutil.copytree(workdir / "model", model)
    args = ["--batch-size", "16", "--micro-batch-size", "8", "--max-steps", "3"]
    out = run(workdir, str(tmp_path / "out"), "--model", str(model), *args, "--stop-at-step", "1")
    state_file = out / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert set(state["model"]) == {"model"} and "model.safetensors" in state["model"]["model"]
    weights = load_file(model / "model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, model / "model.safetensors", metadata={"format": "pt"})
    argv = tiny_run_args(workdir, out, "--model", str(model), *args, "--lr", "1e-3", "--resume")
    assert train.cli(argv) == 2
    err = capsys.readouterr().err
    assert err == (f"error: --resume: --model {model} is not what the run started on (model.safetensors changed), so "
                   "its reference would be another model; restore it, or --overwrite to start afresh\n")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})  # the same tensors, written anew
    state_file.write_text(json.dumps({key: value for key, value in state.items() if key != "model"}))  # earlier
    assert train.cli(argv[:-1] + ["--stop-at-step", "2", "--resume"]) == 0  # a checkpoint recording none resumes
    os.utime(model / "model.safetensors", (1e9, 1e9))  # as a copy on another node has it
    assert train.cli(argv) == 0 and (out / "final").is_dir()
    assert identity_changes({"model": {"hub": "org/m", "revision": "a1"}}, {"model": {"hub": "org/m", "revision": "b2"}}) \
        == ["the model's hub snapshot a1 -> b2"]
    # a hub model not cached when the run started has no snapshot to compare
    assert identity_changes({"model": {"hub": "org/m"}}, {"model": {"hub": "org/m", "revision": "b2"}}) == []
    assert identity_changes({"model": {"w.bin": [1, "x"]}}, {"model": {"w.bin": [1, "x"], "v.bin": [2, "y"]},
                                                              "adapter": {}}) == ["v.bin appeared"]
    assert identity_changes({"adapter": {"a.bin": [1, "x"]}}, {"adapter": {"a.bin": [1, "y"]}}) == [
        "the adapter's a.bin changed"]


def test_resume_refuses_an_adapter_model_whose_base_changed(workdir, tmp_path, capsys):
    """An adapter directory as --model loads on the base its adapter_config.json names: that base is part of the
    reference, and a checkpoint that did not record it (an earlier version) still resumes."""
    import shutil

    from safetensors.torch import save_file

    base = tmp_path / "base"
    shutil.copytree(workdir / "model", base)
    adapter = run(workdir, str(tmp_path / "lora"), "--model", str(base), "--lora-r", "4", "--max-steps", "1",
                  "--batch-size", "16", "--micro-batch-size", "8") / "final"
    args = ["--model", str(adapter), "--batch-size", "16", "--micro-batch-size", "8", "--max-steps", "3"]
    out = run(workdir, str(tmp_path / "out"), *args, "--stop-at-step", "1")
    state_file = out / "checkpoint-1" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert set(state["model"]) == {"model", "base"} and "model.safetensors" in state["model"]["base"]
    weights = load_file(base / "model.safetensors")
    save_file({k: v * 1.01 for k, v in weights.items()}, base / "model.safetensors", metadata={"format": "pt"})
    argv = tiny_run_args(workdir, out, *args, "--lr", "1e-3", "--resume")
    assert train.cli(argv) == 2
    assert capsys.readouterr().err == (
        f"error: --resume: --model {adapter} is not what the run started on (the base's model.safetensors changed), "
        "so its reference would be another model; restore it, or --overwrite to start afresh\n")
    state_file.write_text(json.dumps({**state, "model": {"model": state["model"]["model"]}}))  # an earlier version's
    assert train.cli(argv) == 0 and (out / "final").is_dir()


def test_resume_refuses_changed_data_and_a_finished_run_without_checkpoints(workdir, tmp_path, capsys):
    import shutil

    data = tmp_path / "pairs.jsonl"
    shutil.copy(workdir / "pairs.jsonl", data)
    args = ["--dataset", str(data), "--batch-size", "16", "--micro-batch-size", "8", "--max-steps", "4"]
    out = run(workdir, str(tmp_path / "out"), *args, "--stop-at-step", "2")
    lines = data.read_text().splitlines(keepends=True)
    data.write_text("".join(lines[:-10]))  # the same path, fewer pairs
    argv = tiny_run_args(workdir, out, *args, "--lr", "1e-3", "--resume")
    assert train.cli(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: the training pairs are not the ones the run started on (62 pairs now, "
                          "72 then") and err.count("\n") == 1
    data.write_text("".join(reversed(lines)))  # as many pairs, in another order
    assert train.cli(argv) == 2 and "--dataset changed" in capsys.readouterr().err
    data.write_text("".join(lines))
    state_file = out / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert state["data"]["rendering"] == RENDERING
    # a checkpoint of an earlier rendering (none recorded: 1) whose tokens of the same file differ
    state_file.write_text(json.dumps({**state, "data": {"pairs": 72, "digest": "0" * 20}}))
    assert train.cli(argv) == 2 and ("the checkpoint's pairs were rendered and tokenized by an earlier version of this "
                                     f"library (rendering 1, now {RENDERING})") in capsys.readouterr().err
    # one of an earlier version that split its held-out pairs pair by pair (none recorded), training other pairs
    assert state["data"]["held_out_by"] == "prompt"
    earlier = {key: value for key, value in state["data"].items() if key != "held_out_by"}
    state_file.write_text(json.dumps({**state, "data": {**earlier, "digest": "0" * 20}}))
    assert train.cli(argv) == 2 and ("error: --resume: the checkpoint's run split off its held-out pairs (--test-size) "
                                     "pair by pair, as an earlier version") in capsys.readouterr().err
    state_file.write_text(json.dumps(state))
    assert train.cli(argv) == 0 and (out / "final").is_dir()
    finished = (out / "final" / "model.safetensors").read_bytes()
    assert list(out.glob("checkpoint-*"))  # a finished run with its checkpoints: its last steps are not trained again
    assert train.cli(argv) == 2
    assert f"error: --resume: {out} holds a finished run (final/), nothing to continue" in capsys.readouterr().err
    for checkpoint in out.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    assert train.cli(argv) == 2
    assert "holds a finished run (final/), nothing to continue" in capsys.readouterr().err
    assert (out / "final" / "model.safetensors").read_bytes() == finished


def test_an_update_that_breaks_the_model_is_never_saved(workdir, tmp_path, capsys):
    """The loss of a step is computed before its update: a finite loss can leave weights or log-probs that are not.
    Neither a checkpoint nor final/ is then written, and the message says what can be resumed."""
    base = ["--warmup-ratio", "0", "--batch-size", "16", "--micro-batch-size", "8"]
    # lr 1e39 overflows fp32: the weights become inf at the first update, and checkpoint-1 is refused
    out = tmp_path / "inf"
    assert train.cli(tiny_run_args(workdir, out, *base, "--lr", "1e39", "--max-steps", "2", "--save-steps", "1",
                                   "--eval-steps", "5")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: step 1: the weights are not finite (") and "so checkpoint-1 is not written" in err
    assert "No checkpoint was saved before it" in err and not list(out.glob("checkpoint-*"))
    # lr 1e30 keeps the weights finite but the held-out loss is NaN: stopped before final/
    out = tmp_path / "nan"
    assert train.cli(tiny_run_args(workdir, out, *base, "--lr", "1e30", "--max-steps", "1")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: step 1: the held-out loss is nan (not finite); stopping.")
    assert not (out / "final").exists()


def test_a_json_object_of_record_lists_is_a_dataset_with_splits(workdir, tmp_path, capsys):
    rows = [json.loads(line) for line in (workdir / "pairs.jsonl").read_text().splitlines()]
    data = tmp_path / "splits.json"
    data.write_text(json.dumps({"train": rows[:40], "test": rows[40:46]}))
    run(workdir, str(tmp_path / "out"), "--dataset", str(data), "--max-steps", "1", "--batch-size", "8",
        "--micro-batch-size", "4")
    out = capsys.readouterr().out
    assert f"train: {data} [train] (40 records): 40 rows" in out and f"eval: {data} [test] (6 records): 6 rows" in out
    assert train.cli(tiny_run_args(workdir, tmp_path / "out2", "--dataset", str(data), "--train-split", "x")) == 2
    assert "no split 'x' (available: train, test)" in capsys.readouterr().err
    assert train.cli(tiny_run_args(workdir, tmp_path / "out3", "--dataset", str(data), "--eval-split", "train")) == 2
    assert "--eval-split 'train' is the training split" in capsys.readouterr().err


@pytest.mark.parametrize("epochs, steps_per_epoch, steps", [(0.57, 100, 57), (1.15, 20, 23), (2, 7, 14), (0.5, 3, 1),
                                                            (0.01, 10, 1)])
def test_epochs_give_the_steps_they_name(epochs, steps_per_epoch, steps):
    """--epochs x steps per epoch, floored after rounding away float error (0.57 * 100 is 56.99999999999999)."""
    assert train.run_length(parse_settings(["--epochs", str(epochs)]), steps_per_epoch) == steps


def test_unknown_flag_exits_before_training(capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_settings(["--no-such-flag", "1"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err


def test_config_file_keys_and_flag_override(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"beta": 0.3, "micro-batch-size": 4, "model": "x"}))
    cfg = parse_settings(["--config", str(file), "--beta", "0.5"])
    assert (cfg.loss.beta, cfg.micro_batch_size, cfg.lr) == (0.5, 4, 3e-5)
    file.write_text(json.dumps({"betta": 0.3}))
    with pytest.raises(ConfigError, match="unknown setting 'betta'"):
        parse_settings(["--config", str(file)])
    # a setting given twice, in one spelling or both, is refused: JSON alone would keep the last in silence
    file.write_text('{"max-length": 80, "max_length": 90}')
    with pytest.raises(ConfigError, match=r"c.json: max_length is given twice \('max-length' and 'max_length'\)$"):
        parse_settings(["--config", str(file)])
    file.write_text('{"beta": 0.3, "lr": 1e-5, "beta": 0.2}')
    with pytest.raises(ConfigError, match=r"c.json: 'beta' is given twice$"):
        parse_settings(["--config", str(file)])
    file.write_text('{"_comment": "a", "beta": 0.3, "_comment": "b"}')  # comments may repeat
    assert parse_settings(["--config", str(file)]).loss.beta == 0.3


@pytest.mark.parametrize("flags", [("--gradient-checkpointing",), ("--no-precompute-ref",), ("--no-completion-only",),
                                   ("--no-fused-lm-head",), ("--recompute-softmax",), ("--no-group-by-length",),
                                   ("--layout", "padded"), ("--layout", "packed"), ("--layout", "shared_prompt")])
@pytest.mark.slow
def test_memory_and_speed_switches_do_not_change_the_result(workdir, flags):
    """Each switch changes how the numbers are computed, never the numbers: losses and log-probs to 1e-5 (fp32; a
    sequence log-prob near -112 has an fp32 spacing of 7.6e-6, so sums also get 1e-6 relative); weights after two
    AdamW steps to 1e-4 (Adam divides by sqrt(v), amplifying rounding where gradients are ~0)."""
    common = ("--batch-size", "16", "--micro-batch-size", "8", "--max-steps", "2", "--warmup-ratio", "0",
              "--max-eval-pairs", "4")
    base = workdir / "switch-base"
    if not base.exists():
        run(workdir, "switch-base", *common)
    switched = run(workdir, "switch-" + "-".join(f.strip("-") for f in flags), *common, *flags)
    a, b = final_weights(base), final_weights(switched)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=0)
    la, lb = run_metrics(base), run_metrics(switched)
    for key in ("loss", "logps/chosen", "logps/rejected", "rewards/margins"):
        assert [r[key] for r in la] == pytest.approx([r[key] for r in lb], abs=1e-5, rel=1e-6), key


def loss_state_at(out_dir: Path, step: int) -> dict:
    return torch.load(out_dir / f"checkpoint-{step}" / "extra.pt", weights_only=True)["loss_state"]


@pytest.mark.slow
def test_bco_pair_micro_batch_8_equals_micro_2_times_accumulation_4(workdir):
    """bco_pair's running reward mean moves once per optimizer step from the whole batch: micro-batch 8 and
    micro-batch 2 x accumulation 4 give the same state, losses and weights."""
    # lr 1e-4: AdamW's first steps move every weight by ~lr whatever the gradient's size, so rounding differences
    # of the accumulation order grow with lr (2e-5 at 1e-3, for sigmoid DPO too)
    common = ("--loss", "bco_pair", "--batch-size", "8", "--max-steps", "3", "--warmup-ratio", "0", "--lr", "1e-4",
              "--save-steps", "2", "--max-eval-pairs", "4")
    whole = run(workdir, "bco-micro8", *common, "--micro-batch-size", "8")
    split = run(workdir, "bco-micro2", *common, "--micro-batch-size", "2")
    assert json.loads((split / "run_config.json").read_text())["accumulation_steps"] == 4
    state_whole, state_split = loss_state_at(whole, 2)["bco_pair"], loss_state_at(split, 2)["bco_pair"]
    assert state_whole["steps"] == state_split["steps"] == 2
    assert abs(state_whole["reward_mean"]) > 1e-3  # the state moved, so step 3 depends on it
    assert state_split["reward_mean"] == pytest.approx(state_whole["reward_mean"], abs=1e-7)
    wa, wb = final_weights(whole), final_weights(split)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0)
    ma, mb = run_metrics(whole), run_metrics(split)
    for ra, rb in zip(ma, mb):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5), ra["step"]


@pytest.mark.slow
def test_rpo_normalize_tokens_is_the_same_however_the_step_is_split(workdir):
    """--rpo-normalize tokens divides by the whole step's mean chosen length: micro-batch 8 and micro-batch 2 x
    accumulation 4 train the same weights, and they differ from the per-answer mean's."""
    common = ("--rpo-alpha", "1.0", "--batch-size", "8", "--max-steps", "2", "--warmup-ratio", "0", "--lr", "1e-4",
              "--max-eval-pairs", "4")
    whole = run(workdir, "rpo-tokens-micro8", *common, "--rpo-normalize", "tokens", "--micro-batch-size", "8")
    split = run(workdir, "rpo-tokens-micro2", *common, "--rpo-normalize", "tokens", "--micro-batch-size", "2")
    sequence = run(workdir, "rpo-sequence-micro8", *common, "--micro-batch-size", "8")
    wa, wb, ws = final_weights(whole), final_weights(split), final_weights(sequence)
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0)
    assert max((wa[k] - ws[k]).abs().max().item() for k in wa) > 1e-5
    for ra, rb in zip(run_metrics(whole), run_metrics(split)):
        assert ra["loss"] == pytest.approx(rb["loss"], abs=1e-5), ra["step"]


@pytest.mark.slow
def test_resume_refuses_other_run_settings_and_accepts_logging_changes(workdir, capsys):
    common = ("--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "3", "--max-eval-pairs", "4")
    out = run(workdir, "resume-check", *common, "--stop-at-step", "1")
    # checkpoints hold tensors and plain values only: they load without unpickling code
    for name in ("extra.pt", "optimizer.pt"):
        torch.load(out / "checkpoint-1" / name, weights_only=True)
    base = tiny_run_args(workdir, out, "--lr", "1e-3", *common, "--resume")
    assert train.cli(base + ["--beta", "0.2", "--seed", "1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --resume:") and "\n" not in err
    assert "--seed 0 -> 1" in err and "--beta 0.1 -> 0.2" in err
    assert not (out / "checkpoint-2").exists() and not (out / "final").exists()
    # evaluation, logging and speed settings may change: the run continues
    assert train.cli(base + ["--eval-steps", "1", "--micro-batch-size", "2", "--layout", "packed"]) == 0
    assert (out / "final").is_dir()


def test_reference_log_probs_only_for_the_pairs_the_run_trains_on(workdir, capsys):
    out = run(workdir, "ref-used", "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2",
              "--max-eval-pairs", "4")
    printed = capsys.readouterr().out
    assert "reference log-probs of 16 train pairs (of 72): computed" in printed
    cached = {f.name.split("-")[0]: torch.load(f, weights_only=True) for f in (out / "reference_cache").iterdir()}
    assert cached["train"]["chosen"].shape == (16,) and cached["eval"]["chosen"].shape == (4,)
    assert torch.isfinite(cached["train"]["chosen"]).all()


@pytest.mark.slow
def test_ld_dpo_scores_policy_and_reference_alike(workdir):
    """--ld-alpha weighs the tails of policy and reference log-probs alike (else the step-0 check would stop the
    run: the policy would differ from its reference), caches the reference apart from a plain run's, and changes
    the training; at 1 it is DPO."""
    common = ("--batch-size", "16", "--micro-batch-size", "8", "--max-steps", "2", "--max-eval-pairs", "8",
              "--warmup-ratio", "0")
    plain, ld, one = (run(workdir, name, *common, *flags) for name, flags in (
        ("ld-plain", ()), ("ld-half", ("--ld-alpha", "0.5")), ("ld-one", ("--ld-alpha", "1"))))
    caches = {out: sorted(f.name for f in (out / "reference_cache").iterdir()) for out in (plain, ld)}
    assert not set(caches[plain]) & set(caches[ld])
    half_ref, plain_ref = (torch.cat(list(torch.load(out / "reference_cache" / caches[out][-1], weights_only=True)
                                          .values())) for out in (ld, plain))
    assert (half_ref >= plain_ref - 1e-5).all() and (half_ref > plain_ref + 1e-3).any()  # half of some tails
    a, b, c = (run_metrics(out, "train")[-1] for out in (plain, ld, one))
    assert a["loss"] != pytest.approx(b["loss"], abs=1e-6) and a["loss"] == pytest.approx(c["loss"], abs=1e-6)


def test_auto_layout_is_shared_prompt_where_it_is_exact_else_padded():
    from harness import tiny_phi

    cfg = parse_settings(["--model", "m", "--max-length", "48"])
    assert cfg.layout == "auto"
    model = tiny_phi()
    assert train.collator(cfg, 0, model)[0] == "shared_prompt"
    model.config.sliding_window = 16  # a window shorter than --max-length: blocks would not be exact
    assert train.collator(cfg, 0, model)[0] == "padded"
    model.config.sliding_window = None
    model.config._attn_implementation = "eager"
    assert train.collator(cfg, 0, model)[0] == "padded"
    with pytest.raises(UserError, match="use --layout padded"):
        train.collator(parse_settings(["--model", "m", "--layout", "packed"]), 0, model)


@pytest.mark.slow
def test_a_step_the_grad_scaler_skips_leaves_the_loss_state(workdir, monkeypatch):
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 127))
    out = run(workdir, "overflow-bco", "--precision", "fp16", "--loss", "bco_pair", "--batch-size", "8",
              "--micro-batch-size", "8", "--max-steps", "2", "--save-steps", "1", "--warmup-ratio", "0",
              "--max-eval-pairs", "4")
    record = run_metrics(out, "train")[0]
    assert record["skipped_steps"] == 1
    assert loss_state_at(out, 1)["bco_pair"]["steps"] == 0


def test_settings_differences_name_each_change_and_default_what_an_older_checkpoint_lacks():
    from dpo.checkpoint import settings_differences

    defaults = {"beta": 0.1, "seed": 42, "discopop_tau": 0.05}
    saved = {"beta": 0.1, "seed": 42}  # written before --discopop-tau existed
    assert settings_differences(saved, {"beta": 0.1, "seed": 42, "discopop_tau": 0.05}, defaults) == []
    assert settings_differences(saved, {"beta": 0.2, "seed": 42, "discopop_tau": 0.1}, defaults) == \
        ["--beta 0.1 -> 0.2", "--discopop-tau 0.05 -> 0.1"]


@pytest.mark.slow
def test_an_unreadable_checkpoint_is_one_line(workdir, capsys):
    common = ("--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "2", "--max-eval-pairs", "4")
    out = run(workdir, "corrupt", *common, "--stop-at-step", "1")
    (out / "checkpoint-1" / "extra.pt").write_bytes(b"not a torch file")
    base = tiny_run_args(workdir, out, "--lr", "1e-3", *common, "--resume")
    assert train.cli(base) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "extra.pt: cannot be loaded as tensors" in err and "\n" not in err


def test_summary_table_heads_each_column_with_its_step():
    """With --log-steps 2 the first logged step is 2: the table says so rather than "first step"."""
    table = train.summary({"step": 2, "loss": 0.69}, {"step": 8, "loss": 0.5}, {"loss": 0.4}, Path("out"), 0)
    header, loss = table.splitlines()[1:3]
    assert header.split() == ["step", "2", "step", "8", "eval"]
    assert loss.split() == ["loss", "0.6900", "0.5000", "0.4000"]

"""Crash safety: SIGKILL at random points, SIGTERM, NaN losses; the last good checkpoint always survives."""

import random
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from dpo.checkpoint import latest_checkpoint, list_checkpoints
from harness import make_run_dir, run_metrics, start_train, tiny_run_args

TIMING = {"pairs_per_s", "tokens_per_s"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = make_run_dir(tmp_path_factory.mktemp("crash"), 56)
    args = tiny_run_args(root, None, "--lr", "1e-3", "--batch-size", "8", "--micro-batch-size", "4", "--max-steps",
                         "8", "--save-steps", "1", "--eval-steps", "4", "--max-eval-pairs", "8")
    # the uninterrupted run, in a process like the interrupted ones (same threads, so bitwise comparable)
    process = start_train(args + ["--output-dir", str(root / "reference-run")])
    assert process.wait(timeout=600) == 0
    return root, args


def assert_identical_runs(a: Path, b: Path):
    wa, wb = load_file(a / "final" / "model.safetensors"), load_file(b / "final" / "model.safetensors")
    for key in wa:
        assert torch.equal(wa[key], wb[key]), key
    strip = lambda records: [{k: v for k, v in r.items() if k not in TIMING} for r in records]  # noqa: E731
    assert strip(run_metrics(a)) == strip(run_metrics(b))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_sigkill_at_random_points_then_resume_is_identical(setup, seed):
    root, args = setup
    out = root / f"killed-{seed}"
    rng = random.Random(seed)
    kills = 0
    for attempt in range(12):
        run_args = args + ["--output-dir", str(out)] + (["--resume"] if out.exists() else [])
        process = start_train(run_args)
        if kills < 3:
            # a random point, defined by progress rather than time so it holds on fast and slow machines:
            # a few steps past the last checkpoint, then a random fraction of a step
            done = max([step for step, _ in list_checkpoints(out)], default=0)
            target = done + rng.randint(1, 3)
            deadline = time.time() + 300
            while process.poll() is None and time.time() < deadline and \
                    max([step for step, _ in list_checkpoints(out)], default=0) < target:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
                kills += 1
                # whatever was interrupted, every checkpoint directory that exists is complete
                for _, path in list_checkpoints(out):
                    assert (path / "model" / "config.json").is_file() and (path / "optimizer.pt").is_file()
                continue
        else:
            output = process.communicate(timeout=600)[0]
            assert process.returncode == 0, output[-3000:]
        if (out / "final").is_dir():
            break
    assert kills >= 1, "the run finished before any kill; lengthen it"
    assert_identical_runs(root / "reference-run", out)


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits_cleanly(setup):
    root, args = setup
    out = root / "terminated"
    process = start_train(args + ["--output-dir", str(out)])
    deadline = time.time() + 300
    while not list_checkpoints(out) and time.time() < deadline:  # wait until training is under way
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output[-3000:]
    if not (out / "final").is_dir():  # the signal arrived before the last step
        assert "SIGTERM received: checkpoint saved" in output
        assert start_train(args + ["--output-dir", str(out), "--resume"]).wait(timeout=600) == 0
    assert_identical_runs(root / "reference-run", out)


NAN_LOSS = '''
import torch
import torch.nn.functional as F


def nan_at_third_call(x, cfg):
    """Sigmoid DPO, except that the 3rd micro-batch (step 2) gives NaN."""
    x.state["calls"] = x.state.get("calls", 0) + 1 if torch.is_grad_enabled() else x.state.get("calls", 0)
    h = (x.policy_chosen_logps - x.reference_chosen_logps) - (x.policy_rejected_logps - x.reference_rejected_logps)
    loss = -F.logsigmoid(cfg.beta * h)
    return loss * float("nan") if x.state["calls"] == 3 else loss
'''


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(setup, tmp_path, capsys, precision):
    root, args = setup
    loss_file = tmp_path / "nan_loss.py"
    loss_file.write_text(NAN_LOSS)
    out = tmp_path / "run"
    code = train.cli(args + ["--output-dir", str(out), "--loss", f"{loss_file}:nan_at_third_call",
                             "--precision", precision, "--max-steps", "3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "step 2: loss is nan" in err and "\n" not in err.strip()
    assert latest_checkpoint(out).name == "checkpoint-1"  # the last good one, intact and loadable
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()
    load_file(out / "checkpoint-1" / "model" / "model.safetensors")
    assert not (out / "checkpoint-2").exists() and not (out / "final").exists()


@pytest.mark.slow
def test_nan_loss_skip_option_counts_and_continues(setup, tmp_path):
    root, args = setup
    loss_file = tmp_path / "nan_loss.py"
    loss_file.write_text(NAN_LOSS)
    out = tmp_path / "run"
    assert train.main(args + ["--output-dir", str(out), "--loss", f"{loss_file}:nan_at_third_call", "--on-nan",
                              "skip", "--max-steps", "3"]) == 0
    train_records = run_metrics(out, "train")
    assert [r["skipped_steps"] for r in train_records] == [0, 1, 1]
    assert train_records[1]["loss"] is None  # logged as null, never as a silent NaN
    # the skipped step left the weights as step 1 made them
    step1, step2 = (load_file(out / f"checkpoint-{s}" / "model" / "model.safetensors") for s in (1, 2))
    for key in step1:
        assert torch.equal(step1[key], step2[key]), key


def test_a_crash_while_an_old_checkpoint_is_deleted_leaves_only_complete_ones(tmp_path, monkeypatch):
    """Rotation deletes the oldest checkpoint; a process killed halfway through that deletion must not leave a
    partial directory that still looks like a checkpoint (a resume would load it)."""
    import shutil

    import dpo.checkpoint as checkpoint

    def save(step):
        def save_model(directory):
            directory.mkdir(parents=True)
            (directory / "config.json").write_text("{}")
        checkpoint.save_checkpoint(tmp_path, step, save_model=save_model, optimizer_state={}, scaler_state=None,
                                   trainer_state={}, loss_state={}, keep=2)

    save(1)
    save(2)
    real_rmtree = shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        (Path(path) / "model" / "config.json").unlink()  # part of the directory is gone when the process dies
        raise SystemExit("killed")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_midway)
    with pytest.raises(SystemExit):
        save(3)  # checkpoint-3 is in place; deleting checkpoint-1 dies
    monkeypatch.setattr(checkpoint.shutil, "rmtree", real_rmtree)
    found = list_checkpoints(tmp_path)
    assert [step for step, _ in found] == [2, 3]
    for _, path in found:
        assert (path / "model" / "config.json").is_file() and (path / "optimizer.pt").is_file()
    save(4)  # the next save clears what the crash left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "checkpoint-4"]


def test_final_is_replaced_whole_or_not_at_all(tmp_path, monkeypatch):
    """final/ is published as checkpoints are: a crash between moving the old one aside and renaming the new one in
    leaves both whole (was: the old final/ deleted file by file first)."""
    import os

    import dpo.checkpoint as checkpoint

    def write(directory, text):
        (directory / "model").mkdir(parents=True)
        (directory / "model" / "weights").write_text(text)

    final, tmp = tmp_path / "final", tmp_path / "final.tmp"
    write(tmp, "old")
    checkpoint.publish(tmp, final)
    write(tmp, "new")
    real_replace = os.replace

    def dies_at_the_second_rename(source, target):
        if Path(source) == tmp:
            raise SystemExit("killed")
        real_replace(source, target)

    monkeypatch.setattr(checkpoint.os, "replace", dies_at_the_second_rename)
    with pytest.raises(SystemExit):
        checkpoint.publish(tmp, final)
    monkeypatch.setattr(checkpoint.os, "replace", real_replace)
    assert (tmp_path / "final.discarded" / "model" / "weights").read_text() == "old"
    assert (tmp / "model" / "weights").read_text() == "new"
    checkpoint.publish(tmp, final)  # the next save clears what the crash left
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]
    assert (final / "model" / "weights").read_text() == "new"

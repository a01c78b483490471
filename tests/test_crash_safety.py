"""Crash safety: SIGKILL at random points, SIGTERM, NaN losses; the last good checkpoint always survives."""

import math
import os
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train
from dpo.checkpoint import latest_checkpoint, list_checkpoints
from harness import child_env, make_run_dir, run_metrics, start_train, tiny_run_args

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
                if (out / "final").is_dir():  # killed after final/ was in place: a finished run, not resumed
                    break
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


def test_sigterm_during_an_overwrites_set_up_puts_the_old_run_back(setup, tmp_path):
    """Before the loop SIGTERM would end the process at once, the old run left aside for the next --overwrite to
    delete; it is a failed set-up like any other."""
    root, args = setup
    out = tmp_path / "run"
    assert start_train(args + ["--output-dir", str(out), "--max-steps", "1"]).wait(timeout=600) == 0
    before = sorted(p.name for p in out.iterdir())
    process = start_train(args + ["--output-dir", str(out), "--overwrite", "--seed", "1"],
                          env=child_env(PYTHONUNBUFFERED="1"))
    for line in process.stdout:
        if line.startswith("train:"):  # the data is read: the models and the reference pass come next
            process.send_signal(signal.SIGTERM)
            break
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 128 + signal.SIGTERM and "is restored as it was" in output, output[-2000:]
    assert sorted(p.name for p in out.iterdir()) == before and not (tmp_path / ".run.replaced").exists()


def test_a_second_sigterm_while_the_old_run_is_put_back_does_not_cut_it_short(tmp_path, monkeypatch):
    """srun signals every task and torchrun forwards its own: a second SIGTERM lands while the old run is restored."""
    import os
    import shutil

    import dpo.checkpoint as checkpoint

    out = tmp_path / "run"
    (out / "checkpoint-5").mkdir(parents=True)
    (out / "run_config.json").write_text("{}")
    replaced = checkpoint.prepare_output_dir(out, resume=False, overwrite=True)
    real_rmtree = shutil.rmtree

    def rmtree_then_signal(path, *args, **kwargs):
        real_rmtree(path, *args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(SystemExit) as stopped:
        with checkpoint.replacing(replaced, lambda *a: None):
            (out / "metrics.jsonl").write_text("")  # what the new run's set-up wrote
            monkeypatch.setattr(shutil, "rmtree", rmtree_then_signal)
            os.kill(os.getpid(), signal.SIGTERM)
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    assert stopped.value.code == 128 + signal.SIGTERM
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-5", "run_config.json"]
    assert not replaced.aside.exists() and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


NAN_LOSS = '''
import torch
import torch.nn.functional as F


def nan_at_third_call(x, cfg):
    """Sigmoid DPO, except that the 3rd micro-batch (step 2) gives NaN."""
    x.state["calls"] = x.state.get("calls", 0) + 1 if torch.is_grad_enabled() else x.state.get("calls", 0)
    h = (x.policy_chosen_logps - x.reference_chosen_logps) - (x.policy_rejected_logps - x.reference_rejected_logps)
    loss = -F.logsigmoid(cfg.beta * h)
    return loss * float("nan") if x.state["calls"] == 3 else loss


def nan_grad_at_third_call(x, cfg):
    """Sigmoid DPO whose 3rd micro-batch (step 2) has a finite loss and a NaN gradient: sqrt'(0) times 0."""
    x.state["calls"] = x.state.get("calls", 0) + 1 if torch.is_grad_enabled() else x.state.get("calls", 0)
    h = (x.policy_chosen_logps - x.reference_chosen_logps) - (x.policy_rejected_logps - x.reference_rejected_logps)
    loss = -F.logsigmoid(cfg.beta * h)
    return loss + torch.sqrt((h - h.detach()) ** 2) if x.state["calls"] == 3 else loss
'''


@pytest.mark.slow
@pytest.mark.parametrize("precision, loss, message", [
    ("fp32", "nan_at_third_call", "step 2: loss is nan (not finite)"),
    ("bf16", "nan_at_third_call", "step 2: loss is nan (not finite)"),
    ("fp32", "nan_grad_at_third_call", "step 2: gradient norm is nan (the loss 0.69"),
])
def test_nan_loss_stops_naming_the_step_and_keeps_the_checkpoint(setup, tmp_path, capsys, precision, loss, message):
    root, args = setup
    loss_file = tmp_path / "nan_loss.py"
    loss_file.write_text(NAN_LOSS)
    out = tmp_path / "run"
    code = train.cli(args + ["--output-dir", str(out), "--loss", f"{loss_file}:{loss}",
                             "--precision", precision, "--max-steps", "3"])
    assert code == 2
    err = capsys.readouterr().err
    assert message in err and "\n" not in err.strip()
    assert latest_checkpoint(out).name == "checkpoint-1"  # the last good one, intact and loadable
    assert (out / "checkpoint-1" / "trainer_state.json").is_file()
    load_file(out / "checkpoint-1" / "model" / "model.safetensors")
    assert not (out / "checkpoint-2").exists() and not (out / "final").exists()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["nan_at_third_call", "nan_grad_at_third_call"])
def test_nan_loss_skip_option_counts_and_continues(setup, tmp_path, loss):
    root, args = setup
    loss_file = tmp_path / "nan_loss.py"
    loss_file.write_text(NAN_LOSS)
    out = tmp_path / "run"
    assert train.main(args + ["--output-dir", str(out), "--loss", f"{loss_file}:{loss}", "--on-nan",
                              "skip", "--max-steps", "3"]) == 0
    train_records = run_metrics(out, "train")
    assert [r["skipped_steps"] for r in train_records] == [0, 1, 1]
    if loss == "nan_at_third_call":
        assert train_records[1]["loss"] is None  # logged as null, never as a silent NaN
    else:
        assert train_records[1]["grad_norm"] is None and math.isfinite(train_records[1]["loss"])
    # the skipped step left the weights as step 1 made them
    step1, step2 = (load_file(out / f"checkpoint-{s}" / "model" / "model.safetensors") for s in (1, 2))
    for key in step1:
        assert torch.equal(step1[key], step2[key]), key


def save_small_checkpoint(out_dir: Path, step: int) -> None:
    """checkpoint-<step> of a model that is a config file alone, the newest 2 kept (dpo.checkpoint's rotation)."""
    import dpo.checkpoint as checkpoint

    def save_model(directory):
        directory.mkdir(parents=True)
        (directory / "config.json").write_text("{}")

    checkpoint.save_checkpoint(out_dir, step, save_model=save_model, optimizer_state={}, scaler_state=None,
                               trainer_state={}, loss_state={}, keep=2)


def test_a_crash_while_an_old_checkpoint_is_deleted_leaves_only_complete_ones(tmp_path, monkeypatch):
    """Rotation deletes the oldest checkpoint; a process killed halfway through that deletion must not leave a
    partial directory that still looks like a checkpoint (a resume would load it)."""
    import shutil

    import dpo.checkpoint as checkpoint

    def save(step):
        save_small_checkpoint(tmp_path, step)

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


def test_a_checkpoint_that_cannot_be_written_fails_in_one_line_and_leaves_the_last_one(tmp_path, monkeypatch):
    """A full disk while checkpoint-2 is written (torch.save reports it as a RuntimeError): one line naming the
    checkpoint and the one that is intact, nothing of checkpoint-2 left behind."""
    import dpo.checkpoint as checkpoint

    def save(step):
        save_small_checkpoint(tmp_path, step)

    save(1)
    real_save = torch.save

    def disk_full(obj, file, *args, **kwargs):
        if Path(file).name == "optimizer.pt":
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 7558080 vs 7557968")
        real_save(obj, file, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", disk_full)
    with pytest.raises(checkpoint.CheckpointError, match=r"^checkpoint-2 cannot be written \(\[enforce fail at "
                                                         r"inline_container.cc:672\] .*\); checkpoint-1 is intact$"):
        save(2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-1"]
    monkeypatch.setattr(checkpoint.torch, "save", real_save)
    save(2)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [1, 2]

    def a_bug(directory):  # any other RuntimeError is not taken for a full disk: it propagates as it is
        raise RuntimeError("Expected all tensors to be on the same device, but found cuda:0 and cpu!")

    with pytest.raises(RuntimeError, match="^Expected all tensors"):
        checkpoint.save_checkpoint(tmp_path, 3, save_model=a_bug, optimizer_state={}, scaler_state=None,
                                   trainer_state={}, loss_state={}, keep=2)



@pytest.mark.parametrize("where", ["checkpoint-4.tmp", "final.tmp"])
def test_a_full_disk_while_safetensors_writes_the_weights_is_one_line_and_leaves_nothing(tmp_path, monkeypatch,
                                                                                         where):
    """save_pretrained's safetensors reports a full disk as a SafetensorError, neither an OSError nor torch's
    RuntimeError: checkpoint-4's weights and final/'s fail in one line naming the newest intact checkpoint, and leave
    no .tmp directory behind; --resume then finishes the run."""
    import transformers.modeling_utils
    from safetensors import SafetensorError

    from dpo.checkpoint import CheckpointError

    make_run_dir(tmp_path, 40)
    real = transformers.modeling_utils.safe_save_file

    def disk_full(tensors, filename, *args, **kwargs):
        if where in Path(filename).parts:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real(tensors, filename, *args, **kwargs)

    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", disk_full)
    args = tiny_run_args(tmp_path, "run", "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "5",
                         "--save-steps", "2")
    name, intact = ("final/", "checkpoint-4") if where == "final.tmp" else ("checkpoint-4", "checkpoint-2")
    with pytest.raises(CheckpointError, match=f"^{name} cannot be written \\(Error while serializing: I/O error: "
                                              f"No space left on device \\(os error 28\\)\\); {intact} is intact$"):
        train.main(args)
    left = sorted(p.name for p in (tmp_path / "run").iterdir() if p.name.startswith(("checkpoint-", "final")))
    assert left == (["checkpoint-2"] if where == "checkpoint-4.tmp" else ["checkpoint-2", "checkpoint-4"])
    monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", real)
    assert train.main([*args, "--resume"]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()

def test_the_disk_check_counts_the_next_checkpoint_and_the_ones_a_resumed_run_has(tmp_path):
    """A new checkpoint is written before the oldest goes: keep + 1 of them at the most (or keep and final/, if
    larger). The checkpoints already in the directory are space the run has, not space it needs."""
    from dpo.checkpoint import check_disk_space
    from dpo.settings import ConfigError

    model = torch.nn.Linear(10, 10)  # 110 parameters: 1,320 bytes per checkpoint (weights and 2 AdamW moments)
    per_checkpoint, final = 110 * 12, 110 * 4
    check_disk_space(tmp_path, model, merged=False, keep=2, free_bytes=3 * per_checkpoint)
    with pytest.raises(ConfigError, match="2 checkpoint\\(s\\), the next one and final/ need about"):
        check_disk_space(tmp_path, model, merged=False, keep=2, free_bytes=3 * per_checkpoint - 1)
    # the tokenizer's files beside each checkpoint's weights and final/'s
    check_disk_space(tmp_path, model, merged=False, keep=2, free_bytes=3 * (per_checkpoint + 100), files_bytes=100)
    with pytest.raises(ConfigError):
        check_disk_space(tmp_path, model, merged=False, keep=2, free_bytes=3 * (per_checkpoint + 100) - 1,
                         files_bytes=100)
    # merged: final/ holds the trained weights and all weights again, 880 bytes, less than a checkpoint
    check_disk_space(tmp_path, model, merged=True, keep=1, free_bytes=2 * per_checkpoint)
    assert final * 2 < per_checkpoint
    for step in (1, 2):  # a resumed run's two checkpoints, of 1,320 bytes each
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / "trainer_state.json").write_text("{}")
        (tmp_path / f"checkpoint-{step}" / "optimizer.pt").write_bytes(b"0" * (per_checkpoint - 2))
    check_disk_space(tmp_path, model, merged=False, keep=2, free_bytes=per_checkpoint)
    with pytest.raises(ConfigError):
        check_disk_space(tmp_path, model, merged=False, keep=2, free_bytes=per_checkpoint - 1)


def test_each_process_resumes_with_its_own_random_state():
    from dpo.checkpoint import process_rng_state

    resume = {"rng": "rank 0", "rng_per_process": ["rank 0", "rank 1"]}
    assert [process_rng_state(resume, rank, 2) for rank in (0, 1)] == ["rank 0", "rank 1"]
    # another number of processes, or a checkpoint of an earlier version: the main process's state for all
    assert process_rng_state(resume, 2, 3) == "rank 0"
    assert process_rng_state({"rng": "rank 0", "rng_per_process": None}, 1, 2) == "rank 0"


def test_an_unreadable_reference_cache_is_computed_again(tmp_path):
    from dpo.reference import ReferenceLogps, load_cached, save_cached

    cache = tmp_path / "reference_cache" / "train-abc.pt"
    assert load_cached(cache, 3) is None
    save_cached(cache, ReferenceLogps(torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-4.0, -5.0, -6.0])))
    assert load_cached(cache, 3).chosen.tolist() == [-1.0, -2.0, -3.0]
    assert load_cached(cache, 4) is None  # of other pairs
    cache.write_bytes(cache.read_bytes()[:100])  # cut short (a crash of an earlier version, a full disk)
    assert load_cached(cache, 3) is None


@pytest.mark.parametrize("field", ["settings", "health", "data", "total_steps", "skipped_steps", "overflow_steps"])
def test_a_trainer_state_with_a_field_of_the_wrong_kind_is_refused_in_one_line(tmp_path, field):
    import json

    from dpo.checkpoint import CheckpointError, read_trainer_state

    (tmp_path / "trainer_state.json").write_text(json.dumps({"step": 2, field: [1]}))
    kind = "an object" if field in ("settings", "health", "data") else "a count"
    with pytest.raises(CheckpointError, match=f"trainer_state.json: field '{field}' is not {kind}$"):
        read_trainer_state(tmp_path)


@pytest.mark.slow
def test_a_resume_with_a_truncated_reference_cache_recomputes_it_and_a_passed_stop_step_is_refused(setup, tmp_path,
                                                                                                   capsys):
    """The resumed run scores the reference again, from a fresh reference model (not the moved policy), and ends
    as the uninterrupted run ends; --stop-at-step at or before the step a run resumes at would never stop it."""
    root, args = setup
    out = tmp_path / "run"
    assert train.main(args + ["--output-dir", str(out), "--stop-at-step", "3"]) == 0
    for cache in (out / "reference_cache").glob("*.pt"):
        cache.write_bytes(cache.read_bytes()[:100])
    assert train.cli(args + ["--output-dir", str(out), "--resume", "--stop-at-step", "3"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "error: --stop-at-step 3: the run resumes at step 3, so it would never stop there; give a step from 4 to 8, "
        "or leave it out")
    assert train.main(args + ["--output-dir", str(out), "--resume"]) == 0
    assert "unreadable or of other pairs, computed again" in capsys.readouterr().out
    wa, wb = (load_file(run / "final" / "model.safetensors") for run in (root / "reference-run", out))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=0)


def test_a_checkpoint_whose_extra_state_lacks_its_keys_is_refused_in_one_line(tmp_path):
    from dpo.checkpoint import CheckpointError, load_checkpoint

    checkpoint = tmp_path / "checkpoint-3"
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text('{"step": 3}')
    torch.save({"x": 1}, checkpoint / "extra.pt")
    with pytest.raises(CheckpointError, match=r"extra.pt: not a checkpoint's extra state \(no scaler, rng, "
                                              r"loss_state\)$"):
        load_checkpoint(checkpoint)


def test_a_quoted_error_loses_the_terminal_escapes_torch_puts_in_it():
    from dpo.errors import first_line

    assert first_line(RuntimeError("\x1b[1mWeights only load failed\x1b[0m. In PyTorch 2.6\nmore")) == \
        "Weights only load failed. In PyTorch 2.6"


def enospc(what: str) -> OSError:
    import errno

    return OSError(errno.ENOSPC, f"No space left on device ({what})")


@pytest.mark.slow
@pytest.mark.parametrize("where", ["checkpoint-4.tmp", "final.tmp"])
def test_a_full_disk_that_shows_at_fsync_is_one_line_and_leaves_the_last_checkpoint(setup, tmp_path, monkeypatch,
                                                                                     capsys, where):
    """On NFS or under a quota a full disk may show only when the finished files are synced, as they are put in
    place: the same one line as a failed write, nothing of the new directory left, the last checkpoint intact."""
    root, args = setup
    out = tmp_path / "run"
    real_fsync = os.fsync
    names = {}

    def opened(path, *rest, **kwargs):
        handle = real_open(path, *rest, **kwargs)
        names[handle.fileno()] = str(path)
        return handle

    def fsync(fd):
        if where in names.get(fd, ""):
            raise enospc("fsync")
        real_fsync(fd)

    import builtins

    real_open = builtins.open
    monkeypatch.setattr(builtins, "open", opened)
    monkeypatch.setattr(os, "fsync", fsync)
    flags = ["--save-steps", "2", "--max-steps", "6" if where.startswith("checkpoint") else "2"]
    assert train.cli(args + ["--output-dir", str(out), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    name = "checkpoint-4" if where.startswith("checkpoint") else "final/"
    intact = "checkpoint-2 is intact" if where.startswith("checkpoint") else "no checkpoint was saved before it"
    assert err == f"error: {name} cannot be written ([Errno 28] No space left on device (fsync)); {intact}"
    assert not (out / where).exists() and not (out / name.rstrip("/")).exists()


@pytest.mark.slow
def test_a_full_disk_while_metrics_or_the_run_config_are_written_is_one_line(setup, tmp_path, monkeypatch, capsys):
    """metrics.jsonl takes a line at every step, so a disk that fills between checkpoints fails there first: one line
    naming the file and the checkpoint the run leaves. run_config.json, written at the start, the same."""
    import dpo.files
    import dpo.tracking

    root, args = setup
    appends = []

    def opened(path, mode="r", *rest, **kwargs):
        if Path(path).name == "metrics.jsonl" and mode == "a":
            appends.append(path)
            if len(appends) == 3:  # step 3's line: checkpoint-2 was saved before it
                raise enospc("metrics")
        return open(path, mode, *rest, **kwargs)

    monkeypatch.setattr(dpo.tracking, "open", opened, raising=False)
    out = tmp_path / "metrics"
    assert train.cli(args + ["--output-dir", str(out), "--save-steps", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: {out / 'metrics.jsonl'} cannot be written ([Errno 28] No space left on device (metrics)); The last "
                   f"good checkpoint, {out / 'checkpoint-2'}, is intact")
    monkeypatch.delattr(dpo.tracking, "open")
    real_fsync = os.fsync

    def fsync(fd):  # a full disk that shows only at the sync (NFS, a quota)
        if "run_config.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise enospc("run_config")
        return real_fsync(fd)

    monkeypatch.setattr(dpo.files.os, "fsync", fsync)
    out = tmp_path / "config"
    assert train.cli(args + ["--output-dir", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: {out / 'run_config.json'} cannot be written ([Errno 28] No space left on device (run_config))"
    assert not any("run_config" in name for name in os.listdir(out))


def test_a_resume_beside_the_run_an_interrupted_overwrite_set_aside_says_where_it_is(setup, tmp_path, capsys):
    """--overwrite moves the old run to .NAME.replaced until the new one is set up; killed outright in between, the
    old run stays there: a --resume of NAME says so, instead of training from step 0."""
    root, _ = setup
    aside = tmp_path / ".run.replaced"
    shutil.copytree(root / "reference-run", aside, ignore=shutil.ignore_patterns("final"))
    assert list_checkpoints(aside)
    out = tmp_path / "run"
    args = tiny_run_args(root, None, "--batch-size", "8", "--micro-batch-size", "4", "--max-steps", "8")
    assert train.cli(args + ["--output-dir", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (f"error: --resume: {out} holds no complete checkpoint, but {aside} does: the run an --overwrite "
                   "set aside before it was killed; move it back to --output-dir to resume it, or --overwrite to "
                   "start afresh")

"""The run's output directory and its crash-safe checkpoints: everything needed to continue a run exactly.

A checkpoint is written into `checkpoint-<step>.tmp/` and renamed to `checkpoint-<step>/` only once
every file is on disk, so a directory named `checkpoint-<step>` is always complete; a crash mid-write
leaves only a `.tmp` directory that `latest_checkpoint` ignores and the next save removes. Old checkpoints
are renamed to `checkpoint-<step>.discarded` before they are deleted, so a crash during the deletion
cannot leave a partial `checkpoint-<step>` either.
The data position needs no saving of its own: the batch order is a pure function of
(seed, epoch, step), so the optimizer step is the data position.

Every file holds only tensors and plain Python values and is read with `torch.load(weights_only=True)`, so
loading a checkpoint someone shared cannot run code. `trainer_state.json` also records the settings that define
the run (`TrainSettings.run_identity`): `--resume` compares them with its own (`settings_differences`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import signal
import threading
from pathlib import Path
from collections.abc import Iterator
from typing import Any, Callable

import numpy as np
import torch

from dpo.files import sync_directory
from dpo.errors import UserError, first_line
from dpo.settings import ConfigError

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


# what train.py writes into --output-dir: a directory holding one of them (or a checkpoint-N) holds a run
RUN_ENTRIES = ("run_config.json", "metrics.jsonl", "final", "final.tmp", "reference_cache", "rounds", "eval_generate")


def holds_a_run(out_dir: Path) -> bool:
    """Whether the directory holds (part of) a run of train.py."""
    return any(CHECKPOINT_PATTERN.match(entry.name) or entry.name in RUN_ENTRIES for entry in out_dir.iterdir())


class ReplacedRun:
    """The run --overwrite replaces, moved aside (to .NAME.replaced beside it) until the new run has loaded its data
    and models: `restore` puts it back when that set-up fails, `discard` deletes it once the new run is set up."""

    def __init__(self, out_dir: Path, aside: Path):
        self.out_dir, self.aside = out_dir, aside

    def discard(self) -> None:
        """Delete the replaced run (the new one is set up)."""
        shutil.rmtree(self.aside, ignore_errors=True)

    def restore(self) -> None:
        """Put the replaced run back, over what the failed set-up wrote."""
        shutil.rmtree(self.out_dir, ignore_errors=True)
        self.aside.rename(self.out_dir)


@contextlib.contextmanager
def replacing(replaced: ReplacedRun | None, log: Callable[..., None]) -> Iterator[None]:
    """Around a new run's set-up: a failure puts the run --overwrite replaces back, success deletes it. A SIGTERM
    (a scheduler's preemption) is such a failure: its default action would end the process with the old run
    still aside, where the next --overwrite deletes it."""
    handles_term = replaced is not None and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if handles_term else None
    try:
        yield
    except BaseException:
        if replaced is not None:
            with _signals_ignored(handles_term):  # a second signal (srun's, then torchrun's) must not cut it short
                replaced.restore()
            log(f"--overwrite: the new run did not start; {replaced.out_dir} is restored as it was")
        raise
    finally:
        if handles_term:
            signal.signal(signal.SIGTERM, previous)
    if replaced is not None:
        replaced.discard()


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _signals_ignored(active: bool) -> Iterator[None]:
    """SIGTERM and SIGINT ignored inside (in the main thread: `active`), their handlers restored after."""
    saved = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGTERM, signal.SIGINT)} if active else {}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def prepare_output_dir(out_dir: Path, *, resume: bool, overwrite: bool,
                       inputs: dict[str, str] | None = None) -> ReplacedRun | None:
    """Create --output-dir; never reuse a directory holding a run silently. With --overwrite, the old run is moved
    aside (returned, to be discarded or restored), never a directory that holds no run or one of the run's
    `inputs` ({flag: path})."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--output-dir {out_dir} is a file, not a directory")
    replaced = None
    if out_dir.is_dir() and any(out_dir.iterdir()) and not resume:
        if not overwrite:
            raise ConfigError(f"--output-dir {out_dir} already holds files; pass --resume to continue that run "
                              f"or --overwrite to replace it")
        if not holds_a_run(out_dir):
            raise ConfigError(f"--output-dir {out_dir} holds files but no run of train.py (no run_config.json, "
                              "metrics.jsonl, checkpoint-N or final/): --overwrite replaces only a run")
        for flag, value in (inputs or {}).items():
            if Path(value).exists() and Path(value).resolve().is_relative_to(out_dir.resolve()):
                raise ConfigError(f"--overwrite would delete {flag} {value}: it is inside --output-dir {out_dir}")
        if Path.cwd().resolve().is_relative_to(out_dir.resolve()):
            raise ConfigError(f"--overwrite cannot replace --output-dir {out_dir}: it holds the working directory; "
                              "run from outside it")
        aside = out_dir.with_name(f".{out_dir.name}.replaced")
        try:
            if aside.exists():  # left by a set-up killed before it could restore or discard: an older run, replaced
                shutil.rmtree(aside)
            out_dir.rename(aside)
        except OSError as error:
            raise ConfigError(f"--overwrite: cannot move {out_dir} aside ({error.strerror or error})") from None
        replaced = ReplacedRun(out_dir, aside)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write-test"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        if replaced is not None:
            replaced.restore()
        raise ConfigError(f"--output-dir {out_dir} is not writable ({error.strerror or error})") from None
    return replaced


def check_disk_space(out_dir: Path, model: torch.nn.Module, *, merged: bool, keep: int,
                     free_bytes: int | None = None, reference_bytes: int = 0, files_bytes: int = 0) -> None:
    """Fail before training when the run's checkpoints and final/ cannot fit: at the most, `keep` checkpoints
    (`model`'s trained weights and 2 AdamW moments each, `reference_bytes` of a reference model and `files_bytes`
    of the files beside the weights, the tokenizer's) and the larger of one checkpoint more (a new one is written
    before the oldest goes) and final/ (the trained weights, plus every weight when `merged`: a full model or a
    merged LoRA model, and the files). The checkpoints already in `out_dir` (a resumed run's) count as space the
    run has."""
    trained_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    final_params = trained_params + (sum(p.numel() for p in model.parameters()) if merged else 0)
    checkpoint = trained_params * 4 * 3 + reference_bytes + files_bytes
    needed = checkpoint * keep + max(checkpoint, final_params * 4 + files_bytes)
    held = sum(f.stat().st_size for _, path in list_checkpoints(out_dir) for f in path.rglob("*") if f.is_file())
    free = shutil.disk_usage(out_dir).free if free_bytes is None else free_bytes
    if free + min(held, checkpoint * keep) < needed:
        raise ConfigError(f"--output-dir {out_dir}: {free / 2**30:.2f} GiB free, but {keep} checkpoint(s), the next "
                          f"one and final/ need about {(needed - min(held, checkpoint * keep)) / 2**30:.2f} GiB; "
                          "free space or lower --save-total-limit")



def rng_state() -> dict[str, Any]:
    """Every RNG's state as tensors and plain values (numpy's key array becomes a tensor)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                       "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def process_rng_state(resume: dict[str, Any], rank: int, world_size: int) -> dict[str, Any]:
    """The RNG states a process resumes with: its own where the checkpoint holds one per process of a run of this
    many processes (their dropout draws differ), else the main process's."""
    states = resume.get("rng_per_process")
    return states[rank] if states is not None and len(states) == world_size else resume["rng"]


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore every RNG from `rng_state()`'s dict (CUDA's where a GPU is present)."""
    random.setstate(state["python"])
    saved = state["numpy"]
    np.random.set_state((saved["name"], saved["keys"].numpy().astype(np.uint32), saved["position"],
                         saved["has_gauss"], saved["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest checkpoint directory under `output_dir`, or None."""
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


# how a write that failed (a full disk) is reported by torch.save's zip writer (a RuntimeError) and by safetensors,
# which save_pretrained writes with (a SafetensorError: "Error while serializing: I/O error: No space left ...")
WRITE_FAILED = re.compile(r"PytorchStreamWriter failed|file write failed|unexpected pos|No space left|I/O error")


@contextlib.contextmanager
def removed_if_unwritable(tmp: Path, name: str, root: Path) -> Iterator[None]:
    """A write into `tmp` (what becomes `name`) that fails, a full disk above all (an OSError, or torch's or
    safetensors' error saying so), removes `tmp` and raises a one-line CheckpointError naming the newest checkpoint
    under `root`, which is intact. Another error is a bug to see: it propagates as it is."""
    try:
        yield
    except Exception as error:
        if not isinstance(error, OSError) and not WRITE_FAILED.search(str(error)):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        kept = list_checkpoints(root)
        raise CheckpointError(f"{name} cannot be written ({first_line(error)}); "
                              + (f"{kept[-1][1].name} is intact" if kept else "no checkpoint was saved before it")
                              ) from None


def save_checkpoint(
    output_dir: str | Path,
    step: int,
    *,
    save_model: Callable[[Path], None],
    optimizer_state: dict[str, Any],
    scaler_state: dict[str, Any] | None,
    trainer_state: dict[str, Any],
    loss_state: dict[str, Any],
    keep: int,
    save_reference: Callable[[Path], None] | None = None,
    rng_per_process: list[dict[str, Any]] | None = None,
) -> Path:
    """Write checkpoint-<step> atomically and keep only the newest `keep` checkpoints.

    `save_model(directory)` writes the policy in `save_pretrained` format; `save_reference(directory)` a reference
    model that changes during the run (TR-DPO), the same way; `rng_per_process` every process's RNG states under
    torchrun (this process's alone otherwise). A write that fails (a full disk) removes what it wrote and raises a
    one-line CheckpointError; the checkpoints before it are untouched.
    """
    root = Path(output_dir)
    final = root / f"checkpoint-{step}"
    tmp = root / f"checkpoint-{step}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    with removed_if_unwritable(tmp, final.name, root):
        tmp.mkdir(parents=True)
        save_model(tmp / "model")
        if save_reference is not None:
            save_reference(tmp / "reference")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        rngs = rng_per_process or [rng_state()]
        torch.save({"scaler": scaler_state, "rng": rngs[0], "rng_per_process": rngs, "loss_state": loss_state},
                   tmp / "extra.pt")
        # the state file goes last: its presence marks the directory as complete
        (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        publish(tmp, final)  # a re-save of the same step (e.g. after a signal) replaces it; fsync may fail too
    for _, old in list_checkpoints(root)[:-keep]:
        _discard(old)
    for stale in [*root.glob("checkpoint-*.tmp"), *root.glob("checkpoint-*.discarded")]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def publish(tmp: Path, final: Path) -> None:
    """Put the complete directory `tmp` in place of `final`: its files and entries are synced to disk first, and a
    `final` already there is renamed to `<final>.discarded` and deleted only once the new one is in place: a crash at
    any point leaves both whole (the old one as `final` or `<final>.discarded`, the new one as `tmp` or `final`),
    never a part of either."""
    for file in tmp.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    for directory in [*(d for d in tmp.rglob("*") if d.is_dir()), tmp]:  # their entries, before the rename
        sync_directory(directory)
    aside = final.with_name(final.name + ".discarded")
    if aside.exists():  # left by a crash; `final` is whole
        shutil.rmtree(aside)
    replacing = final.exists()
    if replacing:
        os.replace(final, aside)
    os.replace(tmp, final)
    sync_directory(final.parent)
    if replacing:
        shutil.rmtree(aside, ignore_errors=True)


def _discard(checkpoint: Path) -> None:
    """Delete a checkpoint directory so that a crash midway never leaves a partial `checkpoint-<step>`:
    it is first renamed (atomic) out of the name pattern, then removed."""
    doomed = checkpoint.with_name(checkpoint.name + ".discarded")
    if doomed.exists():
        shutil.rmtree(doomed, ignore_errors=True)
    os.replace(checkpoint, doomed)
    sync_directory(checkpoint.parent)
    shutil.rmtree(doomed, ignore_errors=True)


class CheckpointError(UserError):
    """A checkpoint that cannot be read (corrupt, or holding objects other than tensors and plain values)."""


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """A checkpoint's trainer_state.json (its step, the run's settings, ...); a CheckpointError if unreadable."""
    file = Path(path) / STATE_FILE
    try:
        state = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise CheckpointError(f"{file}: cannot be read ({first_line(error)})") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise CheckpointError(f"{file}: not a trainer state (no step)")
    for field in ("settings", "health", "data", "model"):
        if field in state and not isinstance(state[field], dict):
            raise CheckpointError(f"{file}: field {field!r} is not an object")
    for field in ("total_steps", "skipped_steps", "overflow_steps"):
        if field in state and not (isinstance(state[field], int) and state[field] >= 0):
            raise CheckpointError(f"{file}: field {field!r} is not a count")
    return state


PROCESSES = "processes"  # the number of torchrun processes in a run's identity (not a setting; dpo.train_settings)


def settings_differences(saved: dict[str, Any], current: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """'--name saved -> current' for every setting of `current` that differs from the saved one; a setting the
    checkpoint does not record (one added since it was written) counts as its default."""
    changes = []
    for name, after in current.items():
        before = saved.get(name, defaults.get(name))
        if before != after:
            label = "torchrun processes" if name == PROCESSES else f"--{name.replace('_', '-')}"
            changes.append(f"{label} {json.dumps(before)} -> {json.dumps(after)}")
    return changes


def _load_tensors(file: Path, mmap: bool = False) -> Any:
    try:
        return torch.load(file, weights_only=True, mmap=mmap)
    except Exception as error:  # pickle, zip and torch raise many types for a corrupt or foreign file
        raise CheckpointError(f"{file}: cannot be loaded as tensors and plain values ({first_line(error)})") from None


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint at `path`: its trainer state, optimizer state (memory-mapped), grad scaler, RNG
    states, the loss's state, and the directory of its model."""
    path = Path(path)
    extra = _load_tensors(path / "extra.pt")
    missing = [key for key in ("scaler", "rng", "loss_state") if not isinstance(extra, dict) or key not in extra]
    if missing:
        raise CheckpointError(f"{path / 'extra.pt'}: not a checkpoint's extra state (no {', '.join(missing)})")
    return {
        "trainer_state": read_trainer_state(path),
        # memory-mapped: each process pages in what it copies into its optimizer (the largest file), and the
        # pages can be dropped once copied
        "optimizer": _load_tensors(path / "optimizer.pt", mmap=True),
        "scaler": extra["scaler"],
        "rng": extra["rng"],
        "rng_per_process": extra.get("rng_per_process"),  # not in checkpoints of earlier versions
        "loss_state": extra["loss_state"],
        "model_dir": path / "model",
        "reference_dir": path / "reference",  # written under --sync-ref-model only
    }

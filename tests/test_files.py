"""Files written whole or not at all (dpo/files.py): what is synced, what a failure leaves, the permissions."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import sys

import pytest
import torch

import dpo.files
from dpo.files import write_atomically, write_text_atomically


def test_the_file_and_then_its_directory_are_synced_before_and_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real_fsync(fd)

    def replace(source, target):
        synced.append(("renamed", str(target)))
        return real_replace(source, target)

    monkeypatch.setattr(dpo.files.os, "fsync", fsync)
    monkeypatch.setattr(dpo.files.os, "replace", replace)
    path = tmp_path / "sub" / "round-1.pt"
    write_atomically(path, lambda handle: torch.save({"x": torch.arange(3)}, handle))
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.arange(3))
    assert len(synced) == 3
    assert os.path.basename(synced[0]).startswith(".round-1.pt.") and synced[0].endswith(".tmp")  # the data, first
    assert synced[1:] == [("renamed", str(path)), str(path.parent)]  # then the rename, then the directory entry


@pytest.mark.parametrize("failure", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_failure_at_the_sync_keeps_the_old_file_and_leaves_no_temporary_file(tmp_path, monkeypatch, failure):
    path = tmp_path / "run_config.json"
    path.write_text("old")

    def fsync(fd):
        raise failure

    monkeypatch.setattr(dpo.files.os, "fsync", fsync)
    with pytest.raises(type(failure)):
        write_text_atomically(path, "new")
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["run_config.json"]


def test_a_failure_inside_the_writer_keeps_the_old_file(tmp_path):
    path = tmp_path / "cache.pt"
    path.write_bytes(b"old")

    def half_then_fail(handle):
        handle.write(b"half")
        raise RuntimeError("[enforce fail at inline_container.cc] PytorchStreamWriter failed writing file")

    with pytest.raises(RuntimeError, match="PytorchStreamWriter failed"):
        write_atomically(path, half_then_fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["cache.pt"]


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_a_new_file_follows_the_umask_and_a_replaced_one_keeps_its_mode(tmp_path, umask):
    fresh = tmp_path / "new.json"
    before = os.umask(umask)
    try:
        write_text_atomically(fresh, "é")  # written as UTF-8 whatever the locale
        (tmp_path / "plain.json").write_text("as open() makes it")
    finally:
        os.umask(before)
    assert fresh.read_bytes() == "é".encode("utf-8")
    assert (fresh.stat().st_mode & 0o777) == ((tmp_path / "plain.json").stat().st_mode & 0o777) == 0o666 & ~umask
    private = tmp_path / "private.json"
    private.write_text("old")
    private.chmod(0o600)
    write_text_atomically(private, "new")
    assert private.read_text() == "new" and (private.stat().st_mode & 0o777) == 0o600


def test_a_write_killed_outright_leaves_a_temporary_file_the_next_write_removes(tmp_path):
    """SIGKILL runs no cleanup: the temporary file stays until the next write of the same file, which removes the
    temporaries of processes that no longer run and keeps those of a process still writing."""
    target = tmp_path / "train-0123.pt"
    script = ("import sys, time\nfrom dpo.files import write_atomically\n"
              "def write(handle):\n    handle.write(b'half'); handle.flush(); print('writing', flush=True); "
              "time.sleep(600)\n"
              "write_atomically(sys.argv[1], write)\n")
    child = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "writing"
    child.kill()
    child.wait()
    orphaned = list(tmp_path.glob(".train-0123.pt.*.tmp"))
    assert len(orphaned) == 1 and not target.exists()
    live = tmp_path / f".train-0123.pt.{socket.gethostname()}-{os.getpid()}.abcdefgh.tmp"  # a write of a process that still runs
    live.write_bytes(b"in progress")
    other = tmp_path / f".other.pt.{socket.gethostname()}-{child.pid}.abcdefgh.tmp"  # another file's write
    other.write_bytes(b"x")
    elsewhere = tmp_path / f".train-0123.pt.other.host-{child.pid}.abcdefgh.tmp"  # another machine's
    elsewhere.write_bytes(b"x")
    write_text_atomically(target, "whole")
    assert target.read_text() == "whole"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name, elsewhere.name])

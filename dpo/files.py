"""Files written whole or not at all: whoever reads one (a resumed run, another process, a power cut) finds the old
file or the new one, never a part of either."""

from __future__ import annotations

import contextlib
import glob
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable


def write_atomically(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """`write(handle)` into a temporary file beside `path` (its missing parents made), synced to disk, renamed over
    `path`, and the rename synced. A failure (an OSError; a full disk that torch.save reports as a RuntimeError)
    removes the temporary file and propagates: a file already at `path` stays as it was. The new file keeps an
    existing file's permissions, else those of a file opened for writing (0o666 less the umask), not the
    temporary file's private 0o600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_orphaned_temporaries(path)
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.{socket.gethostname()}-{os.getpid()}.", suffix=".tmp",
                                     dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())  # where a full disk on NFS or under a quota shows
        os.chmod(temporary, stat.S_IMODE(path.stat().st_mode) if path.is_file() else 0o666 & ~current_umask())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    sync_directory(path.parent)


def remove_orphaned_temporaries(path: Path) -> None:
    """Remove the temporary files beside `path` that a write of it left when its process was killed outright
    (SIGKILL, a power cut): those of a process of this machine that no longer runs (another machine's, on a shared
    file system, are its own to judge)."""
    prefix = f".{path.name}."
    for temporary in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        owner = temporary.name[len(prefix):-len(".tmp")].rpartition(".")[0]  # <host>-<pid>, then mkstemp's letters
        host, _, pid = owner.rpartition("-")
        if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
            with contextlib.suppress(OSError):
                temporary.unlink()


def process_alive(pid: int) -> bool:
    """Whether process `pid` is running on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def write_text_atomically(path: str | Path, text: str) -> None:
    """`text` as UTF-8 at `path`, as `write_atomically`."""
    write_atomically(path, lambda handle: handle.write(text.encode("utf-8")))


def current_umask() -> int:
    """The process's umask: read from /proc where Linux shows it, else by setting it and setting it back (for that
    instant another thread's new file would get 0o022)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def sync_directory(path: Path) -> None:
    """Sync a directory's entries (a rename into it) to disk, where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

"""One owner per folder: an exclusive lock that a second koff process is refused with the holder's name.

Every command that writes a run or export folder (decompose, resume, export, add-domain) holds the
lock of the folder it writes, and of the folder it reads where that one could change under it. The
lock is ``flock`` on a file beside the folder, ``.<name>.lock``, which records the holder's pid,
command and start time for the refusal's message. The kernel releases a ``flock`` when its process
dies, however it dies, so a lock file left by a killed run is stale by construction: the next
command takes it without asking anyone to delete anything. The holder removes the file when it is
done. Locks are re-entrant within a process (a command that locks a folder can call code that
locks it again).

``flock`` is local to one machine: on a network file system shared by several machines, it does
not keep a process on another machine out.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from koff.errors import KoffError

_HELD: dict[Path, int] = {}  # lock file -> nesting depth, in this process


class FolderBusyError(KoffError):
    """Another process holds the folder's lock."""


def lock_path(folder: str | os.PathLike) -> Path:
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


@contextmanager
def folder_lock(folder: str | os.PathLike, command: str) -> Iterator[None]:
    """Hold ``folder``'s lock for the block; ``FolderBusyError`` at once if another process holds it."""
    path = lock_path(folder)
    if path in _HELD:
        _HELD[path] += 1
        try:
            yield
        finally:
            _HELD[path] -= 1
        return
    fd = _acquire(path, Path(folder), command)
    _HELD[path] = 1
    try:
        yield
    finally:
        del _HELD[path]
        try:
            path.unlink()  # while still holding it: a process waiting on this file retries on a new one
        except FileNotFoundError:
            pass
        os.close(fd)


def _acquire(path: Path, folder: Path, command: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderBusyError(f"{folder} is in use by {holder}; wait for it to finish, or stop it first") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                break  # the file is still the lock file (its last holder did not remove it meanwhile)
        except FileNotFoundError:
            pass
        os.close(fd)
    record = {"pid": os.getpid(), "host": socket.gethostname(), "command": command,
              "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps(record).encode())
    return fd


def _holder(fd: int) -> str:
    try:
        record = json.loads(os.pread(fd, 4096, 0) or b"{}")
        return f"{record['command']} (pid {record['pid']} on {record['host']}, since {record['since']})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another koff process"

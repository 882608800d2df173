"""Atomic writes and cross-process locks: a reader never sees a half-written file or folder."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import LoraplexError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; readers such as a serving process need more
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success it replaces `path`, which is never missing in between.

    Linux swaps the two folders in one step (renameat2 RENAME_EXCHANGE); elsewhere the old folder is renamed
    aside first, and `recover_replaced` puts it back if the process died before the new one took its place.
    Hidden siblings (`.<name>.*.tmp`, `.<name>.old-*`) are all a kill can leave; `remove_leftovers` clears them.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes 0700
    try:
        yield tmp
        _readable(tmp)
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the old folder
        else:
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.rmdir(old)
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically; False where the system cannot (then the caller renames in two steps)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):  # this file system or kernel cannot exchange
        return False
    raise OSError(code, os.strerror(code), str(b))


def _leftovers(folder: Path, name: str) -> tuple[list[Path], list[Path]]:
    """(previous folders renamed aside, temporary ones) that writes of `folder/name` left; exact names only, so
    the leftovers of another name ('a.b' beside 'a') are never taken."""
    random = r"[a-z0-9_]{8}"  # tempfile's random part
    old = re.compile(rf"\.{re.escape(name)}\.old-{random}")
    tmp = re.compile(rf"\.{re.escape(name)}\.{random}\.tmp")
    entries = sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []
    return [e for e in entries if old.fullmatch(e.name)], [e for e in entries if tmp.fullmatch(e.name)]


def recover_replaced(path: Path) -> bool:
    """Put back the previous folder of an `atomic_dir` replace that died between its two renames."""
    path = Path(path)
    olds = sorted(_leftovers(path.parent, path.name)[0], key=lambda p: p.stat().st_mtime)
    if path.exists() or not olds:
        return False
    os.replace(olds[-1], path)
    return True


def remove_leftovers(folder: Path, name: str) -> list[str]:
    """Remove what an interrupted `atomic_dir` or `atomic_write_text` of `folder/name` left; the names removed.

    A previous folder renamed aside and never replaced is put back first. Only for a `name` that no other
    process is writing (the caller holds its lock)."""
    recover_replaced(Path(folder) / name)
    olds, tmps = _leftovers(folder, name)
    for entry in olds + tmps:
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
    return [entry.name for entry in olds + tmps]


def _readable(folder: Path) -> None:
    """Give every file the umask's mode: some writers (safetensors) create files as 0600."""
    mode = 0o666 & ~_umask()
    for root, _dirs, files in os.walk(folder):
        for name in files:
            os.chmod(os.path.join(root, name), mode)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive advisory lock held for the block (other processes wait)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


_held: dict[str, list] = {}  # lock path -> [open file, depth]: a process may take its own lock again
_held_guard = threading.Lock()


class LockBusy(LoraplexError):
    """Another process holds the lock."""


@contextlib.contextmanager
def owned_lock(path: Path, what: str, on_takeover=None) -> Iterator[None]:
    """An exclusive lock that refuses at once (LockBusy) if another process holds it, naming that process.

    The lock file records who holds it (pid, `what`, since when). The kernel frees the lock of a process that
    died, so such a lock is taken over; `on_takeover(line)` hears about it. Re-entrant within one process.
    """
    path = Path(path)
    key = str(path.resolve())
    with _held_guard:
        if key in _held:
            _held[key][1] += 1
            taken = None
        else:
            taken = _take(path, what, on_takeover)
            _held[key] = [taken, 1]
    try:
        yield
    finally:
        with _held_guard:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                fh = _held.pop(key)[0]
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
                fh.close()


def _take(path: Path, what: str, on_takeover):
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a+", encoding="utf-8")
    try:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = _holder(fh.read())
        fh.close()
        raise LockBusy(f"in use by {holder}") from None
    fh.seek(0)
    previous = fh.read().strip()
    if previous and on_takeover is not None:  # written by a holder that ended without unlocking: it died
        on_takeover(f"took over the lock of {_holder(previous)}, which is no longer running")
    fh.seek(0)
    fh.truncate()
    fh.write(json.dumps({"pid": os.getpid(), "what": what, "since": time.time()}))
    fh.flush()
    return fh


def _holder(text: str) -> str:
    try:
        info = json.loads(text)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"]))
        return f"pid {info['pid']} ({info['what']}) since {since}"
    except (ValueError, KeyError, TypeError):
        return "another process"

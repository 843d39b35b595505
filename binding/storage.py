"""Writing files so that a kill at any instant loses nothing, and nothing of a user's is ever replaced.

- ``atomic_write_text``: a temporary file beside the target, fsynced, then ``os.replace`` (atomic on POSIX).
- ``replace_dir``: a new folder takes an old one's place by an atomic exchange of the two names
  (``renameat2(RENAME_EXCHANGE)`` on Linux), so at every instant the name holds the old run or the new one;
  where the exchange is not available, the old one is moved aside under a name ``recover_dir`` restores.
- ``check_writable``: an unwritable or full output folder is found before the work starts, in one line.
- ``clean_stale``: hidden temporary folders a killed run left behind are removed on the next run.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import shutil
import tempfile
import time
from pathlib import Path

__all__ = ["OutputError", "atomic_write_text", "check_writable", "clean_stale", "recover_dir", "replace_dir"]

_RENAME_EXCHANGE = 2
STALE_AFTER_S = 3600.0  # a temporary folder older than this belongs to no live run


class OutputError(OSError):
    """An output folder cannot take what would be written; the message says which and why."""


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2); False where the system cannot."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd = -100
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _aside(target: Path) -> Path:
    return target.with_name(f".{target.name}.replaced")


def replace_dir(new: Path, target: Path) -> None:
    """Put the folder ``new`` at ``target`` (which may exist), atomically; the old content is deleted after."""
    new, target = Path(new), Path(target)
    if not target.exists():
        os.replace(new, target)
        return
    if _exchange(new, target):
        shutil.rmtree(new, ignore_errors=True)  # ``new`` now names the old folder
        return
    aside = _aside(target)
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(target, aside)
    os.replace(new, target)
    shutil.rmtree(aside, ignore_errors=True)


def recover_dir(target: Path) -> None:
    """After a kill between the two renames of ``replace_dir``'s fallback, put the old folder back."""
    target = Path(target)
    aside = _aside(target)
    if not target.exists() and aside.is_dir():
        os.replace(aside, target)


def clean_stale(parent: Path, suffix: str = ".tmp", older_than_s: float = STALE_AFTER_S) -> int:
    """Remove hidden ``.*{suffix}`` folders and files under ``parent`` older than ``older_than_s``."""
    parent = Path(parent)
    if not parent.is_dir():
        return 0
    now, n = time.time(), 0
    for p in parent.glob(f".*{suffix}"):
        try:
            if now - p.stat().st_mtime < older_than_s:
                continue
            shutil.rmtree(p) if p.is_dir() else p.unlink()
            n += 1
        except OSError:
            pass
    return n


def check_writable(folder: str | os.PathLike, need_bytes: int = 0) -> Path:
    """``folder`` can be written (it, or the nearest folder above it that exists, which is where it would be
    made) and has ``need_bytes`` free; else ``OutputError``. Creates nothing."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"the output {folder} is a file, not a folder")
    base = folder
    while not base.exists():
        base = base.parent
    if not base.is_dir():
        raise OutputError(f"cannot create the output folder {folder}: {base} is a file")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=base)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write into {base} for the output {folder}: {exc.strerror or exc}") from None
    free = shutil.disk_usage(base).free
    if free < need_bytes:
        raise OutputError(f"the output folder {folder} has {free / 1e6:.1f} MB free; about {need_bytes / 1e6:.1f} MB "
                          "are needed")
    return folder

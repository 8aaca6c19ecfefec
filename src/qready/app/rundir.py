"""Run directories: one run at a time (a lock file), a finished or partial run never emptied silently,
and output directories checked writable before any work.

* :func:`run_lock` holds ``<run dir>/.qready.lock`` (``O_CREAT | O_EXCL``; it records the host and
  process id) while a command writes the directory; a second command is refused with a message
  naming the holder. A lock left by a process that died on this host is taken over.
* :func:`check_new_run` refuses to start a run in a directory that already holds one (a checkpoint
  or ``metrics.jsonl``) unless the caller resumes it or forces a restart.
* :func:`check_writable` creates a directory (and its parents) and proves it writable with a probe file;
  :func:`write_atomic` writes a file through a temporary file and a rename.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

LOCK_FILE = ".qready.lock"
RUN_MARKERS = ("checkpoint", "metrics.jsonl", "stages.json")


def check_writable(directory: Path) -> Path:
    """Create ``directory`` (with parents) and check a file can be written in it; ``ValueError`` naming
    it otherwise. Returns ``directory``."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".qready-probe-"):
            pass
    except OSError as err:
        raise ValueError(f"output directory {directory} is not writable: {err.strerror or err}") from None
    return directory


def write_atomic(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` through a temporary file in the same directory and a rename, so a
    reader never sees a half-written file and a failure leaves the previous file intact."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _holder(lock: Path) -> dict:
    try:
        data = json.loads(lock.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


@contextlib.contextmanager
def run_lock(run_dir: Path) -> Iterator[Path]:
    """Hold ``run_dir``'s lock for the duration of the ``with`` block (``ValueError`` if another live
    process holds it)."""
    check_writable(run_dir)
    lock = run_dir / LOCK_FILE
    me = {"host": socket.gethostname(), "pid": os.getpid()}
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(lock)
            stale = holder.get("host") == me["host"] and isinstance(holder.get("pid"), int) \
                and not _alive(holder["pid"])
            if not stale:
                who = f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
                raise ValueError(f"run directory {run_dir} is in use by another qready run ({who}; lock file "
                                 f"{lock}); wait for it to finish or choose another --out") from None
            lock.unlink(missing_ok=True)  # its process died: take the lock over
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:  # pragma: no cover - another process re-created a stale lock between our two attempts
        raise ValueError(f"run directory {run_dir} is in use by another qready run (lock file {lock})")
    try:
        yield run_dir
    finally:
        with contextlib.suppress(OSError):
            if _holder(lock) == me:
                lock.unlink()


def holds_run(run_dir: Path) -> list[str]:
    """What of a previous run ``run_dir`` holds (names of :data:`RUN_MARKERS` present)."""
    return [name for name in RUN_MARKERS if (run_dir / name).exists()]


def check_new_run(run_dir: Path, *, resume: bool, force: bool) -> None:
    """Refuse to start over in a directory holding a finished or partial run unless ``resume`` (continue
    it) or ``force`` (start over) is given."""
    found = holds_run(run_dir)
    if found and not resume and not force:
        raise ValueError(f"run directory {run_dir} already holds a run ({', '.join(found)}); continue it with "
                         "--resume, start over with --force, or choose another --out")


__all__ = ["LOCK_FILE", "check_new_run", "check_writable", "holds_run", "run_lock", "write_atomic"]

"""One writer per run directory: `RUN_DIR/.lock`, created atomically, naming its holder.

The lock file holds `{"pid", "host", "started"}` and is created with `O_CREAT | O_EXCL`, so of
two processes starting on one run directory exactly one gets it; the other is refused, naming
the holder. A lock whose holder is gone (same host, pid no longer alive) is taken over with a
warning: a run killed with SIGKILL leaves its lock behind and must still resume. A lock from
another host is never taken over (its pid means nothing here): remove it by hand once that
run is known to be dead. In multi-process runs only process 0 takes the lock.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run directory; the message names it."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """`with RunLock(run_dir):` holds `run_dir/.lock` for the block (process 0 only)."""

    def __init__(self, run_dir: str | Path, *, active: bool = True):
        self.path = Path(run_dir) / LOCK_FILE
        self.active = active
        self._held = False

    def acquire(self) -> None:
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        for _ in range(2):  # a second try after taking over a dead holder's lock
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                other = self._read_holder()
                if other is None or not self._is_stale(other):
                    raise RunLockedError(self._refusal(other)) from None
                log.warning("%s: taking over the lock of a dead process (pid %s on %s, started "
                            "%s)", self.path, other.get("pid"), other.get("host"),
                            other.get("started"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(holder) + "\n")
            self._held = True
            return
        raise RunLockedError(self._refusal(self._read_holder()))

    def _read_holder(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}  # unreadable: treated as held (never taken over blindly)

    @staticmethod
    def _is_stale(holder: dict) -> bool:
        pid = holder.get("pid")
        return (holder.get("host") == socket.gethostname() and isinstance(pid, int)
                and not _alive(pid))

    def _refusal(self, holder: dict | None) -> str:
        if holder:
            who = (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
                   f"{holder.get('started')}")
        else:
            who = "an unknown holder (the lock file is unreadable)"
        return (f"{self.path.parent}: run directory is in use by {who} (lock file {self.path}); "
                "two writers would interleave metrics and checkpoints. Wait for it, use another "
                "--run-dir, or remove the lock file if that process is gone")

    def release(self) -> None:
        if self._held:
            self._held = False
            try:
                self.path.unlink()
            except OSError as err:
                if err.errno != errno.ENOENT:
                    log.warning("%s: could not remove the lock (%s)", self.path, err)

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

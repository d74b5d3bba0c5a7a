"""One writer per run directory: `RUN_DIR/.lock`, created atomically, naming its holder.

The lock file holds `{"pid", "pid_start", "host", "started"}` and is created with
`O_CREAT | O_EXCL`, so of two processes starting on one run directory exactly one gets it; the
other is refused, naming the holder. A run killed with SIGKILL leaves its lock behind and must
still resume, so a lock whose holder is gone is taken over with a warning:
- same host: the pid is not alive, or it is alive but started at another time than the holder
  (`pid_start`, the kernel's start time of the process: the pid was reused);
- another host (its pid means nothing here): the holder touches the lock every
  `HEARTBEAT_S` while it holds it, and a lock untouched for `STALE_S` is a dead host's.
In multi-process runs only process 0 takes the lock.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import socket
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_FILE = ".lock"
HEARTBEAT_S = 30.0
STALE_S = 600.0  # twenty missed heartbeats: longer than any file-system hiccup


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


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux), None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()  # the command name may hold spaces
    return int(fields[19])  # field 22 of proc_pid_stat(5), counted after pid and comm


class RunLock:
    """`with RunLock(run_dir):` holds `run_dir/.lock` for the block (process 0 only)."""

    def __init__(self, run_dir: str | Path, *, active: bool = True):
        self.path = Path(run_dir) / LOCK_FILE
        self.active = active
        self._held = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self) -> None:
        if not self.active:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        holder = {"pid": os.getpid(), "pid_start": _process_start(os.getpid()),
                  "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")}
        for _ in range(2):  # a second try after taking over a dead holder's lock
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                other = self._read_holder()
                gone = self._is_stale(other) if other else ""
                if not gone:
                    raise RunLockedError(self._refusal(other)) from None
                log.warning("%s: taking over the lock of a dead process (pid %s on %s, started "
                            "%s: %s)", self.path, other.get("pid"), other.get("host"),
                            other.get("started"), gone)
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(holder) + "\n")
            self._held = True
            self._stop.clear()
            self._heartbeat = threading.Thread(target=self._beat, name="runlock-heartbeat",
                                               daemon=True)
            self._heartbeat.start()
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

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            try:
                os.utime(self.path)
            except OSError as err:
                log.warning("%s: could not touch the lock (%s)", self.path, err)

    def _is_stale(self, holder: dict) -> str:
        """Why the holder is gone ('' while it may be alive)."""
        pid = holder.get("pid")
        if not isinstance(pid, int):
            return ""
        if holder.get("host") != socket.gethostname():
            try:
                idle_s = time.time() - self.path.stat().st_mtime
            except OSError:
                return ""
            return f"no heartbeat for {idle_s:.0f} s" if idle_s > STALE_S else ""
        if not _alive(pid):
            return "pid not alive"
        start = holder.get("pid_start")
        if start is not None and start != _process_start(pid):
            return "pid reused by another process"
        return ""

    def _refusal(self, holder: dict | None) -> str:
        if holder:
            who = (f"pid {holder.get('pid')} on host {holder.get('host')}, started "
                   f"{holder.get('started')}")
        else:
            who = "an unknown holder (the lock file is unreadable)"
        elsewhere = (f" (a lock from another host is taken over after {STALE_S:.0f} s without "
                     "its heartbeat)" if holder and holder.get("host") != socket.gethostname()
                     else "")
        return (f"{self.path.parent}: run directory is in use by {who} (lock file {self.path}); "
                "two writers would interleave metrics and checkpoints. Wait for it, use another "
                f"--run-dir, or remove the lock file if that process is gone{elsewhere}")

    def release(self) -> None:
        if self._held:
            self._held = False
            self._stop.set()
            if self._heartbeat is not None:
                self._heartbeat.join()
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

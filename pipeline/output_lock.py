"""One run per output: a lock file naming its owner (host, pid, start), taken before any change.

Two runs writing one manifest would both report success while the last writer wins. The lock
is a small JSON file in the output folder, created exclusively where the filesystem can (local
disks; object stores get a write-then-read-back check). A lock whose owner is gone is taken over
with a message: on the same host when its process no longer exists, elsewhere when its heartbeat
(rewritten every ``HEARTBEAT_S`` by a background thread) is older than ``STALE_S``.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import pyarrow.fs as pafs

from manifests.io import Location, join, resolve

LOCK_NAME = ".controlforge-lock.json"
HEARTBEAT_S = 60.0
STALE_S = 600.0
"""A lock from another host with no heartbeat for this long belongs to a dead run."""

log = logging.getLogger("annotate")


class OutputLocked(RuntimeError):
    """Another live run holds the output."""


@dataclasses.dataclass
class OutputLock:
    """A held lock; ``release`` (or the context manager's exit) removes it."""

    output: str | Location
    owner: dict[str, Any]
    _stop: threading.Event = dataclasses.field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> "OutputLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def check(self) -> None:
        """Raise ``OutputLocked`` when another run has taken the lock over (this one was thought dead)."""
        held = read_lock(self.output) or {}
        if held.get("token") != self.owner["token"]:
            raise OutputLocked(
                f"{self.output}: another run (host {held.get('host')}, pid {held.get('pid')}) took over the lock "
                "while this one ran, so this run does not mark the manifest complete; run the same command "
                "again once that run has finished")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        fs, base = resolve(self.output)
        if (read_lock(self.output) or {}).get("token") == self.owner["token"]:
            try:
                fs.delete_file(join(base, LOCK_NAME))
            except OSError:
                pass

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if (read_lock(self.output) or {}).get("token") != self.owner["token"]:
                log.warning("the lock on %s was taken by another run", self.output)
                return
            self.owner["heartbeat"] = time.time()
            _write(self.output, self.owner)


def acquire(output: str | Location) -> OutputLock:
    """Take the output's lock, or raise ``OutputLocked`` naming the run that holds it."""
    owner = {
        "host": socket.gethostname(), "pid": os.getpid(), "token": uuid.uuid4().hex,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "started_unix": time.time(), "heartbeat": time.time(),
    }
    for _ in range(50):  # later tries follow a takeover of a stale lock (ours or another run's)
        if _create(output, owner):
            lock = OutputLock(output, owner)
            lock._thread = threading.Thread(target=lock._beat, name="output-lock", daemon=True)
            lock._thread.start()
            return lock
        held = read_lock(output)
        if held is None:  # released between our try and the read
            continue
        why = stale_reason(held)
        if why is None:
            raise OutputLocked(
                f"{output} is being written by another run (host {held.get('host')}, pid {held.get('pid')}, "
                f"started {held.get('started')}); nothing was changed: wait for it to finish or choose another "
                f"--output (if that run is dead, delete {join(resolve(output)[1], LOCK_NAME)})"
            )
        if _remove_if_still(output, held):
            log.warning("took over the lock on %s from a run that is gone (host %s, pid %s, started %s: %s)",
                        output, held.get("host"), held.get("pid"), held.get("started"), why)
    raise OutputLocked(f"{output}: could not take the lock; another run took it first (run again to see which)")


def _remove_if_still(output: str | Location, held: dict[str, Any]) -> bool:
    """Remove the lock if it is still the stale one read as ``held``; False when another run replaced
    or removed it first. Several runs may find one stale lock at once: on a local disk they take
    turns through an exclusive takeover file, and each re-reads the lock inside its turn, so only
    the first removes the stale lock and the others find the new owner's."""
    fs, base = resolve(output)
    path = join(base, LOCK_NAME)
    if not isinstance(fs, pafs.LocalFileSystem):  # no exclusive create: best effort
        fs.delete_file(path)
        return True
    turn = f"{path}.takeover"
    if not _create_file(turn, json.dumps({"pid": os.getpid(), "at": time.time()})):
        try:  # a takeover never takes long: one older than a minute was left by a killed run
            if time.time() - os.stat(turn).st_mtime > 60:
                os.unlink(turn)
        except FileNotFoundError:
            pass
        time.sleep(0.05)
        return False
    try:
        if (read_lock(output) or {}).get("token") != held.get("token"):
            return False
        os.unlink(path)
        return True
    finally:
        os.unlink(turn)


def stale_reason(held: dict[str, Any]) -> str | None:
    """Why a lock's owner is gone, or None while it may still be running."""
    if held.get("unreadable"):
        return "the lock file is unreadable"
    if held.get("host") == socket.gethostname():
        pid = held.get("pid")
        if not isinstance(pid, int) or not _alive(pid, held.get("started_unix")):
            return f"process {pid} no longer runs"
        return None
    age = time.time() - float(held.get("heartbeat") or 0)
    return f"no heartbeat for {age:.0f} s" if age > STALE_S else None


def _alive(pid: int, started_unix: float | None) -> bool:
    """Whether ``pid`` runs and is the process that took the lock (not a reuse of its number)."""
    import psutil

    try:
        created = psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return psutil.pid_exists(pid)
    return started_unix is None or created <= float(started_unix) + 1.0


def read_lock(output: str | Location) -> dict[str, Any] | None:
    """The lock's content, or None when there is none (an unreadable lock reads as stale)."""
    fs, base = resolve(output)
    try:
        with fs.open_input_stream(join(base, LOCK_NAME)) as stream:
            return json.loads(stream.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):  # never half-written (created whole, replaced by rename): garbage
        return {"host": None, "pid": None, "heartbeat": 0, "unreadable": True, "token": None}


def _create(output: str | Location, owner: dict[str, Any]) -> bool:
    """Create the lock exclusively; False when one exists."""
    fs, base = resolve(output)
    path = join(base, LOCK_NAME)
    if isinstance(fs, pafs.LocalFileSystem):
        return _create_file(path, json.dumps(owner))
    # Object stores have no exclusive create: write, then read back to see who won a race.
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        return False
    _write(output, owner)
    return (read_lock(output) or {}).get("token") == owner["token"]


def _create_file(path: str, text: str) -> bool:
    """Create ``path`` holding ``text``, or return False when it exists. Written whole under a temp
    name, then hard-linked to its name: the link fails when the file exists, and a reader never sees
    it empty or half-written."""
    tmp = f"{os.path.dirname(path)}/.tmp-{uuid.uuid4().hex}-new-lock"
    with open(tmp, "w") as f:
        f.write(text)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        os.unlink(tmp)
    return True


def _write(output: str | Location, owner: dict[str, Any]) -> None:
    """Replace the lock's content atomically (a reader never sees a half-written lock)."""
    fs, base = resolve(output)
    tmp = join(base, f".tmp-{uuid.uuid4().hex}-lock")
    with fs.open_output_stream(tmp) as stream:
        stream.write(json.dumps(owner).encode())
    fs.move(tmp, join(base, LOCK_NAME))

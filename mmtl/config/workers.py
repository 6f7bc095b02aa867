"""Which ``train`` settings can work on the chosen workers, decided when the pipeline is loaded (in the driver,
before Ray starts) instead of by a worker's traceback.

Rules (DeepSpeed 0.19, checked on CPU workers with the tiny model, ZeRO 0-3 x fp32/bf16 x offload):

* ``precision: fp16`` needs GPU workers: DeepSpeed's CPU accelerator has no loss-scaled fp16 training ("Type
  fp16 is not supported on your device"); on CPU workers use ``bf16`` or ``fp32``.
* ``offload_optimizer`` (ZeRO-Offload) needs ZeRO stage 1-3 (stage 0 has no ZeRO optimizer to offload).
  mmtl's optimizer is a client ``torch.optim`` object, which DeepSpeed refuses with offload unless the config
  sets ``zero_force_ds_cpu_optimizer: false``; :func:`mmtl.train.ds_config.deepspeed_config` sets it, so the
  documented option trains (the torch optimizer then steps on the offloaded fp32 master weights in host memory).
* ``offload_param`` needs ZeRO stage 3 (only stage 3 partitions parameters).
* ``use_gpu: true`` needs ``gpus_per_worker > 0``.

:func:`check_local_devices` adds the checks that depend on the machine when mmtl starts a local Ray instance
(GPUs and CPUs present).
"""
from __future__ import annotations

import os
from typing import Optional


def worker_problems(t) -> list[str]:
    """Every reason the ``train`` section ``t`` (a :class:`mmtl.config.TrainConfig`) cannot work on its
    workers, each naming the field and what works; empty when it can."""
    out = []
    where = "GPU workers" if t.use_gpu else "CPU workers (train.use_gpu=false)"
    if t.precision == "fp16" and not t.use_gpu:
        out.append("train.precision=fp16 cannot train on CPU workers (train.use_gpu=false): DeepSpeed has no "
                   "loss-scaled fp16 on CPU. Use train.precision=bf16 or fp32, or GPU workers (train.use_gpu=true)")
    if t.offload_optimizer and t.zero_stage == 0:
        out.append(f"train.offload_optimizer=true needs a ZeRO optimizer: set train.zero_stage to 1, 2 or 3 (got 0) "
                   f"or train.offload_optimizer=false ({where})")
    if t.offload_param and t.zero_stage != 3:
        out.append(f"train.offload_param=true needs train.zero_stage=3 (got {t.zero_stage}): only ZeRO-3 partitions "
                   "parameters. Set train.zero_stage=3 or train.offload_param=false")
    if t.use_gpu and t.gpus_per_worker <= 0:
        out.append("train.use_gpu=true needs train.gpus_per_worker > 0 (got 0)")
    return out


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch / broken CUDA: no GPUs
        return 0


def _local_bf16() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_bf16_supported())
    except Exception:  # noqa: BLE001
        return True  # unknown: let DeepSpeed decide


def starts_local_ray(address: Optional[str]) -> bool:
    """True when :func:`mmtl.runtime.init_ray` (``address``) starts a new local instance, i.e. no cluster to
    join: no address, no ``$RAY_ADDRESS`` and no ``ray start`` cluster recorded on this machine
    (``address="local"`` always starts one)."""
    if address == "local":
        return True
    if address or os.environ.get("RAY_ADDRESS"):
        return False
    try:
        from ray._private.services import find_bootstrap_address  # noqa: PLC0415

        return not find_bootstrap_address(None)
    except Exception:  # noqa: BLE001 - private API moved: assume a local start
        return True


def check_local_devices(t, address: Optional[str] = None, num_cpus: Optional[float] = None,
                        gpus: Optional[float] = None, bf16: Optional[bool] = None) -> None:
    """Refuse ``train`` settings the Ray instance this process uses cannot place: GPU workers without (enough)
    GPUs, bf16 on GPUs without bf16 (before Ampere: DeepSpeed's "Type bf16 is not supported on your device"),
    ``STRICT_SPREAD`` of more workers than it has nodes, or more worker CPUs than it has (Ray Train would wait
    for them). Checked against the running instance when Ray is already initialised in this process, against
    this machine when mmtl will start a local instance (:func:`starts_local_ray`); a cluster that is joined is
    not checked (it may autoscale; :func:`mmtl.train.placement.check_placement` warns there).

    Args:
        num_cpus / gpus / bf16: override the CPUs / GPUs / GPU bf16 support compared against (tests).
    Raises:
        ValueError: naming the field and the setting that fits.
    """
    import sys

    nodes = 1  # a local instance mmtl starts
    if num_cpus is None:
        if (address and address != "local") or os.environ.get("RAY_ADDRESS"):
            return  # joining a cluster
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            res = ray.cluster_resources()
            num_cpus, gpus = res.get("CPU", 0), res.get("GPU", 0)
            nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        elif not starts_local_ray(address):
            return
    if t.placement_strategy == "STRICT_SPREAD" and t.num_workers > nodes:
        raise ValueError(f"train.placement_strategy=STRICT_SPREAD puts each of the {t.num_workers} workers on its own "
                         f"node, but the Ray instance has {nodes} node(s): use PACK (the default) or SPREAD, or join a "
                         "cluster with --address")
    cpus = num_cpus or os.cpu_count() or 1
    need_cpu = t.num_workers * t.cpus_per_worker
    if need_cpu > cpus:
        raise ValueError(f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker} = "
                         f"{need_cpu:g} CPUs, but the local Ray instance has {cpus:g}: lower train.cpus_per_worker to "
                         f"{cpus / t.num_workers:g} or fewer workers (or join a cluster with --address)")
    if t.use_gpu:
        have = _gpu_count() if gpus is None else gpus
        need = t.num_workers * t.gpus_per_worker
        if have == 0:
            raise ValueError("train.use_gpu=true, but the local Ray instance has no GPU: set train.use_gpu=false "
                             "(CPU workers: train.precision fp32 or bf16) or join a GPU cluster with --address")
        if need > have:
            raise ValueError(f"train.num_workers={t.num_workers} x train.gpus_per_worker={t.gpus_per_worker} = "
                             f"{need:g} GPUs, but the local Ray instance has {have:g}: set train.num_workers <= "
                             f"{int(have // t.gpus_per_worker) or 1} or lower train.gpus_per_worker")
        if t.precision == "bf16" and not (_local_bf16() if bf16 is None else bf16):
            raise ValueError("train.precision=bf16, but this machine's GPUs have no bf16 support: use "
                             "train.precision=fp16 (loss-scaled) or fp32")

"""Estimated memory per worker for the model states, before training starts.

Model states per worker, after the ZeRO paper's accounting (Rajbhandari et al. 2020, "ZeRO: Memory
Optimizations Toward Training Trillion Parameter Models", Sec. 3.1 and Fig. 1), with ``Ψ`` all parameters,
``Ψ_t`` the trainable ones, ``N`` workers and ``b`` bytes per element of the training precision:

* parameters: ``b·Ψ`` (ZeRO-3 partitions them: ``b·Ψ/N``, the frozen ones too);
* fp32 master copy of the trainable parameters when training in bf16/fp16: ``4·Ψ_t`` (ZeRO-1+: ``/N``);
* gradients of the trainable parameters: ``b·Ψ_t`` (ZeRO-2+: ``/N``);
* AdamW moments: ``8·Ψ_t`` (two fp32 tensors; SGD with momentum: ``4·Ψ_t``) (ZeRO-1+: ``/N``).

Offloaded optimizer states (``train.offload_optimizer``) move the master copy and moments to host memory; on
CPU workers that is the same memory, so the estimate keeps them. Activations are not included (they scale
with the micro-batch and are measured as the peak resident memory in ``train/peak_rss_mb`` during training).
"""
from __future__ import annotations

from mmtl.config import TrainConfig

_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def model_state_bytes(params_total: int, params_trainable: int, cfg: TrainConfig) -> dict[str, int]:
    """Bytes per worker for parameters, gradients and optimizer states (see module docstring).

    Args:
        params_total: all parameters ``Ψ`` (elements); params_trainable: ``Ψ_t`` (elements).
        cfg: the train section (``zero_stage``, ``precision``, ``num_workers``, ``optimizer``).

    Returns:
        ``{"params": B, "grads": B, "optimizer": B, "total": B}`` in bytes.
    """
    n, z, b = cfg.num_workers, cfg.zero_stage, _BYTES[cfg.precision]
    params = b * params_total / (n if z >= 3 else 1)
    grads = b * params_trainable / (n if z >= 2 else 1)
    per_elem = (8 if cfg.optimizer == "adamw" else 4) + (4 if cfg.precision != "fp32" else 0)
    optim = per_elem * params_trainable / (n if z >= 1 else 1)
    out = {"params": int(params), "grads": int(grads), "optimizer": int(optim)}
    out["total"] = sum(out.values())
    return out


def describe(est: dict[str, int]) -> str:
    """One line for the console: ``"≈ 123.4 MiB/worker (params 80.0, grads 10.0, optimizer 33.4 MiB)"``."""
    mib = {k: v / 2**20 for k, v in est.items()}
    return (f"~{mib['total']:.1f} MiB/worker for model states (params {mib['params']:.1f}, grads {mib['grads']:.1f},"
            f" optimizer {mib['optimizer']:.1f} MiB; activations not included)")

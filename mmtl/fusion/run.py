"""``mmtl run`` for ``strategy.kind: cross_attention``: frozen towers, trained fusion + VQA / ITM head.

Recipe (called by :func:`mmtl.run.run_pipeline` inside the MLflow run):
  1. build the model, freeze it (:mod:`mmtl.strategies.cross_attention`);
  2. compute the frozen towers' tokens of ``data.train`` and every ``eval.sets`` set once
     (:mod:`mmtl.fusion.features`, cached under ``data.cache_dir`` or ``<runs_root>/cache``);
  3. VQA: the answer vocabulary is ``strategy.fusion.answers``, else ``answers_file``, else the
     ``max_answers`` most frequent train answers; it is written into the pipeline (so into the export's
     ``pipeline.yaml``); soft-score targets (:func:`mmtl.fusion.heads.soft_scores`);
  4. train :class:`mmtl.fusion.task.FusionTaskModule` with :func:`mmtl.run.fit` (Ray Train + DeepSpeed, the
     common loop: checkpoints, resume, MLflow step metrics) on the in-memory arrays ``image_tokens``,
     ``text_tokens``, ``text_mask`` (+ ``answer_target`` for VQA, ``image_id`` / ``text_id`` for ITM);
  5. load the export, evaluate (:mod:`mmtl.eval.fusion_eval`: accuracy overall and per question type), log
     metrics, ``summary.json`` and the export as the run's MLflow model to MLflow.

With ``tracking.log_model`` the export is logged as the run's MLflow model (a pyfunc answering questions or
scoring matches, :mod:`mmtl.fusion.registry`) and registered under ``tracking.model_name`` when set. No
evaluation before training (the gates start at 0 and the head is random: it would be chance).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from mmtl.config import Pipeline
from mmtl.tracking import mlflow_utils as mlu


def answer_vocab(pipe: Pipeline, train_answers: list[list[str]]) -> list[str]:
    """The VQA answer vocabulary (see module docstring, step 3), normalised like the data's answers
    (:func:`mmtl.fusion.features.normalize_answer`: "Red" and "red" are one answer).

    Raises:
        FileNotFoundError: ``answers_file`` is missing; ValueError: fewer than 2 answers.
    """
    from mmtl.fusion.features import normalize_answer
    from mmtl.fusion.heads import build_vocab

    f = pipe.strategy.fusion
    if f.answers:
        vocab = [normalize_answer(a) or "" for a in f.answers]
    elif f.answers_file:
        p = Path(f.answers_file)
        if not p.is_file():
            raise FileNotFoundError(f"strategy.fusion.answers_file={f.answers_file!r} not found")
        vocab = [normalize_answer(ln) for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
    else:
        return build_vocab(train_answers, f.max_answers)
    if "" in vocab:
        raise ValueError("the answer vocabulary has an empty answer")
    dups = sorted({a for a in vocab if vocab.count(a) > 1})
    if dups:
        raise ValueError(f"the answer vocabulary lists {dups} more than once")
    if len(vocab) < 2:
        raise ValueError(f"the answer vocabulary needs >= 2 answers, got {vocab}")
    return vocab


def train_arrays(pipe: Pipeline, ts) -> dict[str, np.ndarray]:
    """The named arrays the workers index (see :class:`mmtl.fusion.task.FusionTaskModule`)."""
    from mmtl.fusion.heads import soft_scores

    arrays = {"image_tokens": ts.image_tokens, "text_tokens": ts.text_tokens, "text_mask": ts.text_mask}
    if pipe.strategy.fusion.task == "itm":  # ids of the image and of the text: known positives are no negatives
        texts = {c: i for i, c in enumerate(sorted(set(ts.captions)))}
        arrays["image_id"] = ts.image_tokens.rows.copy()
        arrays["text_id"] = np.array([texts[c] for c in ts.captions], dtype=np.int64)
    if pipe.strategy.fusion.task == "vqa":
        vocab = {a: i for i, a in enumerate(pipe.strategy.fusion.answers)}
        arrays["answer_target"] = np.stack([soft_scores(a, vocab) for a in ts.answers])
    return arrays


def run_cross_attention(pipe: Pipeline, run_dir: Path, uri: str, run_id: str, resuming: bool, say, t_start: float) -> dict:
    """Run the recipe above and return the summary (also ``<run_dir>/summary.json``).

    Raises:
        ValueError / FileNotFoundError: bad fusion options or answer vocabulary (before training).
        RuntimeError: training failed (the run is left resumable).
    """
    from safetensors.torch import load_file

    from mmtl.data.stream import clean_options
    from mmtl.eval.fusion_eval import evaluate_tokens
    from mmtl.fusion.export import split_state_dict
    from mmtl.fusion.features import load_or_compute
    from mmtl.fusion.task import FusionTaskModule
    from mmtl.models import build_model
    from mmtl.run import _eval_specs, copy_export, fit, report_trainable
    from mmtl.runtime import init_ray
    from mmtl.strategies import apply_strategy, trainable_summary
    from mmtl.train.loop import seed_everything

    f = pipe.strategy.fusion
    seed_everything(pipe.train.seed)
    model = build_model(pipe.model)
    apply_strategy(model, pipe.strategy, zero_stage=pipe.train.zero_stage)
    cache_root = Path(pipe.data.cache_dir or Path(pipe.train.runs_root) / "cache")
    opts = clean_options(pipe, count_tokens=model.count_tokens)  # caption_truncated is counted
    t_tok = time.time()
    sets = {"train": load_or_compute(model, pipe.data.train, f, opts, cache_root, say)}
    for name, spec in _eval_specs(pipe).items():
        sets[name] = load_or_compute(model, spec, f, opts, cache_root, say)
    token_s = time.time() - t_tok
    if f.task == "vqa":
        f.answers = answer_vocab(pipe, sets["train"].answers)
        say(f"answer vocabulary: {len(f.answers)} answers")
    (run_dir / "pipeline.yaml").write_text(pipe.to_yaml())
    module = FusionTaskModule.from_pipeline(pipe, model)
    say(f"trains: {f.kind} fusion + {f.task} head")
    summ = report_trainable(pipe, trainable_summary(module), uri, run_id, say)
    mlu.log_metrics(uri, run_id, {f"data/{n}_{k}": v for n, ts in sets.items() for k, v in ts.stats.items()})
    n_media = sets["train"].image_tokens.shape[1] + int(f.kind == "xattn" and f.global_token)
    if f.kind == "xattn" and n_media > f.max_image_tokens:  # fail here, not inside the Ray workers
        raise ValueError(f"{n_media} image tokens per image > strategy.fusion.max_image_tokens={f.max_image_tokens} "
                         "(the learned position table): raise max_image_tokens or set image_pool")
    arrays = train_arrays(pipe, sets["train"])
    say(f"training arrays: {sum(a.nbytes for a in arrays.values()) / 2**20:.0f} MiB "
        f"({len(sets['train'])} samples, image tokens {arrays['image_tokens'].shape[1:]})")
    init_ray()
    t_train = time.time()
    result = fit(pipe, run_dir, arrays, uri, run_id, say)
    train_s = time.time() - t_train
    export_dir = copy_export(result, run_dir, uri, run_id)
    module.load_state_dict(split_state_dict(load_file(str(export_dir / "model.safetensors"))), strict=True)
    module.eval()
    metrics: dict[str, float] = {}
    for name, ts in sets.items():
        if name == "train" and len(ts) > 4000:
            continue
        metrics.update({f"{name}/{k}": v for k, v in evaluate_tokens(module, pipe, ts).items()})
    final_train = {k: v for k, v in (result.metrics or {}).items() if k.startswith("train/")}
    steps = int((result.metrics or {}).get("steps", 0))
    mlu.log_metrics(uri, run_id, metrics, step=steps)
    for name in sets:
        line = ", ".join(f"{k.split('/')[-1]} {v:.3f}" for k, v in metrics.items()
                         if k.startswith(f"{name}/") and "num_samples" not in k and "out_of_vocab" not in k)
        say(f"{name}: {line}")
    gates = {k: float(np.tanh(v.detach().numpy()).item()) for k, v in module.named_parameters()
             if k.endswith("_gate")}
    summary = {
        "status": "finished", "run_name": run_dir.name, "run_dir": str(run_dir), "mlflow_run_id": run_id,
        "mlflow_tracking_uri": uri, "mlflow_ui": f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000",
        "strategy": "cross_attention", "fusion": f.kind, "task": f.task, "steps": steps,
        "wall_time_s": round(time.time() - t_start, 2), "train_time_s": round(train_s, 2),
        "token_time_s": round(token_s, 2), "image_size": pipe.model.image_size,
        "image_tokens": list(arrays["image_tokens"].shape[1:]), "num_answers": len(f.answers or []),
        "params_trainable": summ["params_trainable"], "tanh_gates": gates,
        "metrics": {**final_train, **metrics}, "export_path": str(export_dir / "model.safetensors"),
        "registered_model": None,
    }
    if pipe.tracking.log_model:
        from mmtl.fusion.registry import log_fusion_model

        summary["registered_model"] = log_fusion_model(uri, run_id, export_dir, f.task, pipe.tracking.model_name)
        if pipe.tracking.model_name:
            say(f"registered: {pipe.tracking.model_name} version {summary['registered_model']['version']}")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    mlu.log_artifacts(uri, run_id, [run_dir / "summary.json"])
    return summary

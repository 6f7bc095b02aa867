"""Evaluate a ``cross_attention`` model: VQA accuracy or ITM accuracy, overall and per question type.

* ``vqa``: ``vqa/overall`` and ``vqa/<question type>``: mean VQA accuracy (the soft score of the argmax
  answer, :func:`mmtl.fusion.heads.vqa_accuracy`); questions whose answers are all outside the vocabulary
  score 0 (counted in ``vqa/out_of_vocab``).
* ``itm``: every sample is scored as a positive pair and against one negative text: the most similar text
  (ITC similarity) among samples of other images with another text in the same chunk of 256;
  ``itm/accuracy`` (positives above 0 and negatives at or below 0, over both), ``itm/<question type>``
  likewise.

:func:`evaluate_vqa` / :func:`evaluate_itm` are the ``vqa`` / ``itm`` metrics of :mod:`mmtl.eval.registry`;
:func:`evaluate_tokens` is the training-time entry point (the fusion recipe), :func:`run_fusion_eval` is
``mmtl eval --task vqa|itm``. The export is loaded by :func:`mmtl.fusion.export.load_fusion_export`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from mmtl.fusion.heads import per_type_accuracy, soft_scores

if TYPE_CHECKING:
    from mmtl.fusion.features import TokenSet


def _chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def _t(a: np.ndarray) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.float() if t.is_floating_point() else t


@torch.no_grad()
def evaluate_vqa(module, ts: TokenSet, answers: list[str], batch_size: int = 256) -> tuple[dict, list[int]]:
    """VQA accuracy of ``module`` (a :class:`~mmtl.fusion.task.FusionTaskModule`) on the N samples of ``ts``.

    Args:
        answers: the answer vocabulary (A answers; the head's A logits).
        batch_size: samples per forward pass.

    Returns:
        ``({"vqa/overall", "vqa/<type>", "vqa/num_samples", "vqa/out_of_vocab"}, predicted answer index per
        sample (N ints in [0, A)))``; accuracies in [0, 1].
    """
    vocab = {a: i for i, a in enumerate(answers)}
    scores, preds = [], []
    for sl in _chunks(len(ts), batch_size):
        logits = module.answer_logits(_t(ts.image_tokens[sl]), _t(ts.text_tokens[sl]), _t(ts.text_mask[sl]))
        target = np.stack([soft_scores(a, vocab) for a in ts.answers[sl]])
        p = logits.argmax(1).numpy()
        preds.extend(int(x) for x in p)
        scores.extend(float(x) for x in target[np.arange(len(p)), p])
    out = {f"vqa/{k}": v for k, v in per_type_accuracy(scores, ts.qtypes).items()}
    out["vqa/num_samples"] = len(ts)
    out["vqa/out_of_vocab"] = sum(1 for a in ts.answers if not any(x in vocab for x in a))
    return out, preds


@torch.no_grad()
def evaluate_itm(module, ts: TokenSet, chunk: int = 256) -> dict:
    """ITM accuracy of ``module`` on ``ts`` (see module docstring): ``{"itm/accuracy", "itm/<type>",
    "itm/num_samples"}``, accuracies in [0, 1]; hard negatives are mined within chunks of ``chunk`` samples."""
    correct: list[float] = []
    ids, texts = np.array(ts.image_ids), np.array(ts.captions)
    for sl in _chunks(len(ts), chunk):
        it, tt, tm = _t(ts.image_tokens[sl]), _t(ts.text_tokens[sl]), _t(ts.text_mask[sl])
        sim = module.similarity(it, tt, tm)
        same = (ids[sl][:, None] == ids[sl][None, :]) | (texts[sl][:, None] == texts[sl][None, :])
        same = torch.from_numpy(same)  # known positives: same image or same text
        sim = sim.masked_fill(same, float("-inf"))
        neg = sim.argmax(1)
        ok_neg = ~same.all(1)
        pos = module.match_logits(it, tt, tm) > 0
        negl = module.match_logits(it, tt[neg], tm[neg]) <= 0
        correct.extend(((pos.float() + torch.where(ok_neg, negl.float(), pos.float())) / 2).tolist())
    out = {f"itm/{k}": v for k, v in per_type_accuracy(correct, ts.qtypes).items()}
    out["itm/accuracy"] = out.pop("itm/overall")
    out["itm/num_samples"] = len(ts)
    return out


def evaluate_tokens(module, pipe, ts: TokenSet) -> dict:
    """Training-time entry point of the fusion recipe: the metrics of ``strategy.fusion.task`` ("vqa" with the
    vocabulary ``strategy.fusion.answers``, else "itm") on ``ts``, through :func:`mmtl.eval.registry.evaluate_task`.
    Names as ``mmtl eval`` reports them (``vqa/overall`` ...); the recipe prefixes the set name."""
    from mmtl.eval.registry import evaluate_task

    if pipe.strategy.fusion.task == "vqa":
        return evaluate_task("vqa", module=module, tokens=ts, answers=pipe.strategy.fusion.answers)
    return evaluate_task("itm", module=module, tokens=ts)


def _generates_text(export_dir) -> bool:
    """Whether the export's model family generates text (``blip``, ``llava``): its ``pipeline.yaml`` only."""
    import yaml

    from mmtl.models.family import TextGeneration, capability
    from mmtl.models.registry import get_family

    try:
        family = (yaml.safe_load((Path(export_dir) / "pipeline.yaml").read_text()) or {})["model"]["family"]
        return capability(get_family(family), TextGeneration) is not None
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return False


def run_fusion_eval(spec: str, task: str, data: str, batch_size: Optional[int] = None, out_dir: Optional[str] = None,
                    log_to_mlflow: bool = True, tracking_uri: Optional[str] = None, say=None) -> dict:
    """``mmtl eval MODEL --task vqa|itm --data SHARDS``: resolve MODEL, compute the frozen towers' tokens of
    the set (``batch_size`` images per forward pass; None: the model pipeline's ``eval.batch_size``), score it;
    writes ``<out_dir>/eval.json`` and logs a nested MLflow run like the other tasks. Returns the JSON-serialisable report.
    ``--task vqa`` on a generative model (``llava``, ``blip``) is free-form VQA: :func:`~mmtl.eval.caption_eval.
    run_caption_eval` generates the answers and scores them (exact match per question type).

    Raises:
        EvalError: ``task`` differs from the model's ``strategy.fusion.task``; ModelSpecError: bad MODEL; see
            :func:`mmtl.fusion.export.load_fusion_export`.
    """
    from mmtl.data.stream import clean_options
    from mmtl.eval.args import EvalError
    from mmtl.eval.mlflow_log import log_eval_run
    from mmtl.eval.resolve import resolve_export
    from mmtl.fusion.export import load_fusion_export
    from mmtl.fusion.features import compute_tokens

    say = say or (lambda m: None)
    t0 = time.time()
    res = resolve_export(spec, tracking_uri)
    try:
        if task == "vqa" and _generates_text(res.export_dir):  # free-form VQA: answers generated as words
            from mmtl.eval.caption_eval import run_caption_eval

            say("free-form VQA of a generative model: answers generated, exact match per question type")
            return run_caption_eval(spec, data, out_dir, log_to_mlflow, tracking_uri, say, task="vqa")
        module, pipe = load_fusion_export(res.export_dir)
        if pipe.strategy.fusion.task != task:
            raise EvalError(f"the model was trained for --task {pipe.strategy.fusion.task}, not {task}")
        opts = clean_options(pipe, count_tokens=module.model.count_tokens)
        ts = compute_tokens(module.model, data, pipe.strategy.fusion, opts, batch_size or pipe.eval.batch_size, say)
        metrics = evaluate_tokens(module, pipe, ts)
        result = {"task": task, "model": res.describe(), "data": str(data), "num_samples": len(ts),
                  "metrics": metrics, "data_stats": ts.stats, "files": {}, "out_dir": out_dir,
                  "embedding": "local", "ks": [],
                  "mlflow": {"logged": False, "reason": "disabled (--no-mlflow)"}}
        files = []
        if out_dir:
            Path(out_dir).mkdir(parents=True, exist_ok=True)
            files = [Path(out_dir) / "eval.json"]
            result["files"]["eval_json"] = str(files[0])
        if log_to_mlflow and not res.mlflow_run_id:
            result["mlflow"] = {"logged": False, "reason": "the model has no MLflow run (plain export folder)"}
        result["seconds"] = round(time.time() - t0, 3)
        if files:
            files[0].write_text(json.dumps(result, indent=2, default=str) + "\n")
        if log_to_mlflow and res.mlflow_run_id:
            try:
                result["mlflow"] = log_eval_run(res, task, str(data), result, files, say)
            except Exception as e:  # the metrics are computed: report the failure, keep the result
                result["mlflow"] = {"logged": False, "reason": f"MLflow logging failed: {type(e).__name__}: {e}"}
        return json.loads(json.dumps(result, default=str))
    finally:
        res.cleanup()

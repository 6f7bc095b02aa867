"""MLflow logging of an ``mmtl eval`` result: a new run nested under the model's training run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from mmtl.eval.args import data_name

Say = Callable[[str], None]


def log_eval_run(res, task: str, data: str, result: dict, files: list[Path], say: Say) -> dict:
    """Log an ``mmtl eval`` result to a new MLflow run ``eval-<task>-<data name>`` nested under the model's run
    (``res``: a :class:`~mmtl.eval.resolve.ResolvedModel` with ``mlflow_run_id``): params, ``result["metrics"]``,
    ``data/<reader count>`` metrics and ``files`` under the artifact folder ``eval/``.

    Returns ``{"logged": True, "eval_run_id", "parent_run_id", "experiment_id", "tracking_uri", "run_name",
    "artifact_path"}``. Raises whatever MLflow raises (the new run is then marked FAILED).
    """
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient

    from mmtl.tracking import mlflow_utils as mlu

    uri, parent = res.tracking_uri, res.mlflow_run_id
    client = MlflowClient(tracking_uri=uri)
    src = client.get_run(parent)
    name = f"eval-{task}-{data_name(data)}"
    tags = {"mlflow.parentRunId": parent, "mmtl.eval.source_run_id": parent, "mmtl.eval.task": task,
            "mmtl.eval.model": res.spec}
    if res.registered:
        tags["mmtl.eval.registered_model"] = json.dumps(res.registered, sort_keys=True)
    run = client.create_run(src.info.experiment_id, run_name=name, tags=tags)
    rid = run.info.run_id
    try:
        params = {"task": task, "data": data, "model": res.spec, "embedding": result["embedding"],
                  "num_samples": result["num_samples"]}
        # the task's own result fields, whichever it has (zero-shot: classes/templates; retrieval: ks; new tasks
        # may have neither)
        if result.get("classes") is not None:
            params.update(num_classes=len(result["classes"]), classes=", ".join(result["classes"]))
        if result.get("templates") is not None:
            params["templates"] = " | ".join(result["templates"])
        params.update({k: result[k] for k in ("label_field", "classes_from") if result.get(k) is not None})
        if result.get("ks") is not None:
            params["ks"] = ",".join(map(str, result["ks"]))
        client.log_batch(rid, params=[Param(k, str(v)[: mlu.MAX_PARAM_CHARS]) for k, v in params.items()])
        mlu.log_metrics(uri, rid, {**result["metrics"], **{f"data/{k}": v for k, v in result["data_stats"].items()}})
        for f in files:
            client.log_artifact(rid, str(f), "eval")
    except BaseException:
        client.set_terminated(rid, "FAILED")
        raise
    client.set_terminated(rid, "FINISHED")
    say(f"logged to MLflow run {rid} (nested under {parent}) at {uri}")
    return {"logged": True, "eval_run_id": rid, "parent_run_id": parent, "experiment_id": src.info.experiment_id,
            "tracking_uri": uri, "run_name": name, "artifact_path": "eval"}

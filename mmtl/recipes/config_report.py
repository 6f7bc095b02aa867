"""``mmtl config``: the resolved pipeline followed by every path it will read or write (as ``#`` comments, so
the output stays valid YAML), including the run folder a run would use now; :func:`missing_inputs` lists the
local inputs that do not exist (``mmtl config`` / ``run`` / ``retrain`` refuse them before anything starts)."""
from __future__ import annotations

import os
from pathlib import Path

from mmtl.config import Pipeline, is_uri


def describe_paths(pipe: Pipeline) -> str:
    """Every path the pipeline will read or write, resolved, as ``#`` comment lines (so ``mmtl config`` output
    stays valid YAML): inputs (``(missing)`` when a plain local path does not exist), the runs root, the run
    folder a run would use now (new, or the unfinished one it resumes), the feature cache, the tracking store
    and artifact root, and the retrain manifests."""
    from mmtl.runtime import select_run_dir
    from mmtl.storage import is_remote, join, local_root
    from mmtl.config.tracking_uri import artifact_root, resolve_tracking_uri

    rows: list[tuple[str, str]] = []

    def add(key: str, spec, note: str = "") -> None:
        if spec is None:
            return
        for one in spec if isinstance(spec, list) else [spec]:
            mark = ""
            if not is_uri(one) and not any(c in one for c in "*?[{") and not os.path.exists(one):
                mark = " (missing)"
            rows.append((key, f"{one}{mark}{note}"))

    d, m, t = pipe.data, pipe.model, pipe.train
    add("data.train", d.train)
    add("data.val", d.val)
    add("data.test", d.test)
    for k, v in d.extra_eval.items():
        add(f"data.extra_eval.{k}", v)
    for key, v in (("model.weights", m.weights), ("model.vision.weights", m.vision.weights),
                   ("model.text.path", m.text.path), ("model.text.tokenizer_path", m.text.tokenizer_path),
                   ("model.init_from", m.init_from),
                   ("strategy.fusion.answers_file", pipe.strategy.fusion.answers_file)):
        add(key, v)
    rows.append(("train.runs_root", t.runs_root))
    try:
        run_dir, resuming = select_run_dir(t.runs_root, t.name, t.resume)
        rows.append(("run folder", f"{run_dir} ({'resumes the unfinished run there' if resuming else 'new'})"))
    except (OSError, ValueError) as exc:
        rows.append(("run folder", f"cannot be chosen: {exc}"))
    rows.append(("data.cache_dir", d.cache_dir or f"{Path(local_root(t.runs_root)) / 'cache'} (default)"))
    source = ("tracking.uri" if pipe.tracking.uri else "$MLFLOW_TRACKING_URI" if os.environ.get("MLFLOW_TRACKING_URI")
              else "default under train.runs_root")
    uri = resolve_tracking_uri(pipe.tracking.uri, t.runs_root)
    rows.append(("tracking store", f"{uri} ({source})"))
    art = artifact_root(uri, t.runs_root)
    rows.append(("artifacts", f"{art}" if art else "the tracking server's artifact store"))
    if pipe.retrain is not None:
        rows.append(("retrain.manifest_dir", pipe.retrain.manifest_dir or f"{join(t.runs_root, 'retrain') if is_remote(t.runs_root) else Path(t.runs_root) / 'retrain'} (default)"))
    width = max(len(k) for k, _ in rows) + 1
    head = (f"# resolved paths: relative paths in the pipeline are relative to {pipe._project_root}"
            if pipe._project_root else "# resolved paths")
    return "\n".join([head] + [f"#   {k + ':':<{width}} {v}" for k, v in rows])


def _inputs(pipe: Pipeline) -> list[tuple[str, object, bool]]:
    """(field, spec, is a shard spec) of every input path of ``pipe``."""
    d, m = pipe.data, pipe.model
    out = [("data.train", d.train, True), ("data.val", d.val, True), ("data.test", d.test, True)]
    out += [(f"data.extra_eval.{k}", v, True) for k, v in d.extra_eval.items() if k in pipe.eval.sets]
    out += [(k, v, False) for k, v in (
        ("model.weights", m.weights), ("model.vision.weights", m.vision.weights), ("model.text.path", m.text.path),
        ("model.text.tokenizer_path", m.text.tokenizer_path), ("model.init_from", m.init_from),
        ("strategy.fusion.answers_file", pipe.strategy.fusion.answers_file))]
    return [(k, v, shards) for k, v, shards in out if v]


def _bundled_hint(pipe: Pipeline, paths: list[str]) -> str:
    """For ``<root>/mmtl/assets/...`` paths that exist in the installed mmtl (a bundled pipeline copied by hand):
    where the files are, and the command that copies a pipeline with its paths fixed."""
    import mmtl

    pkg_root = Path(mmtl.__file__).resolve().parent.parent
    root = Path(pipe._project_root or ".")
    for p in paths:
        try:
            rel = Path(p).relative_to(root)
        except ValueError:
            continue
        if rel.parts[:2] == ("mmtl", "assets") and (pkg_root / rel).exists() and pkg_root != root:
            return (f" (the bundled data is at {pkg_root / rel}; `mmtl pipelines copy NAME DEST` copies a bundled "
                    "pipeline with its paths made absolute)")
    return ""


def missing_inputs(pipe: Pipeline) -> list[str]:
    """One line per local input of ``pipe`` that does not exist: shard specs of ``data.*`` (a folder without
    tars, a glob or brace pattern matching nothing, a missing file; ``data.extra_eval`` sets only when
    ``eval.sets`` names them, as only those are read), weight files / folders, ``model.init_from``
    and the answers file, each naming its field and resolved path; ``package:<dist>`` weights must name an
    installed distribution, ``weights:<name>`` weights must be converted (``mmtl weights get <name>``). URIs (``s3://``, ``gs://``) are not checked here (the run reads them before
    training starts)."""
    from mmtl.data.shardlist import ShardError, resolve_shards

    import importlib.metadata as md

    out = []
    for key, spec, shards in _inputs(pipe):
        specs = spec if isinstance(spec, list) else [spec]
        for one in specs:
            if one.startswith("package:"):  # cheap: is the distribution installed?
                try:
                    md.distribution(one[len("package:"):].strip())
                except md.PackageNotFoundError:
                    out.append(f"{key}: {one}: distribution not installed (pip install {one[len('package:'):]})")
            elif one.startswith("weights:"):  # converted once by `mmtl weights get NAME`: is it in the cache?
                from mmtl.models.fetch import WeightsError, require_converted

                try:
                    require_converted(one[len("weights:"):].strip())
                except WeightsError as exc:
                    out.append(f"{key}: {exc}")
        local = [s for s in specs if not is_uri(s)]
        if not local:
            continue
        if shards:
            try:
                resolve_shards(local if isinstance(spec, list) else local[0])
            except ShardError as exc:
                out.append(f"{key}: {exc}{_bundled_hint(pipe, local)}")
            continue
        for one in local:
            if not os.path.exists(one):
                hint = (" (train the run it points to first, e.g. pipelines/quickstart.yaml for the CoOp pipelines)"
                        if key == "model.init_from" else "")
                out.append(f"{key}: {one} does not exist{hint}")
    return out


def config_report(pipe: Pipeline) -> str:
    """What ``mmtl config`` prints: the resolved pipeline as YAML, then :func:`describe_paths` as comments."""
    return pipe.to_yaml() + describe_paths(pipe)

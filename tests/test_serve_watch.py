"""`mmtl serve --watch-alias`: the registry alias watcher (mmtl.serve.watch) against a real MLflow registry in a
local sqlite store, with the redeploy recorded (the redeploy itself is mmtl.serve.server.start, tested in
tests/test_serve.py)."""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture
def registry(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(tracking_uri=uri, registry_uri=uri)
    c.create_registered_model("tiny")
    for i in (1, 2):
        (tmp_path / f"v{i}").mkdir()
        c.create_model_version("tiny", source=str(tmp_path / f"v{i}"))
    c.set_registered_model_alias("tiny", "champion", "1")
    return c, uri


def test_watcher_redeploys_when_the_alias_moves(registry):
    from mmtl.serve.watch import AliasWatcher, alias_version

    client, uri = registry
    calls, said = [], []
    w = AliasWatcher("models:/tiny@champion", uri, calls.append, say=said.append)
    assert w.served == "1" and alias_version("models:/tiny@champion", uri) == "1"
    assert not w.poll_once() and calls == []
    client.set_registered_model_alias("tiny", "champion", "2")
    assert w.poll_once() and calls == ["2"] and w.served == "2"
    assert not w.poll_once() and calls == ["2"]
    assert any("moved from version 1 to 2" in m for m in said)


def test_failed_redeploy_keeps_the_old_version_and_retries(registry):
    from mmtl.serve.watch import AliasWatcher

    client, uri = registry
    attempts = []

    def flaky(version):
        attempts.append(version)
        if len(attempts) == 1:
            raise RuntimeError("index rebuild failed")

    said = []
    w = AliasWatcher("models:/tiny@champion", uri, flaky, say=said.append)
    client.set_registered_model_alias("tiny", "champion", "2")
    assert not w.poll_once() and w.served == "1" and "still serving version 1" in said[-1]
    assert w.poll_once() and w.served == "2" and attempts == ["2", "2"]
    client.delete_registered_model_alias("tiny", "champion")
    assert not w.poll_once() and w.served == "2" and "cannot read" in said[-1]


def test_watch_alias_needs_a_models_alias_uri():
    from mmtl.serve.watch import AliasWatcher, parse_alias

    assert parse_alias("models:/shop-search@champion") == ("shop-search", "champion")
    for bad in ("runs:/abc/model", "models:/x/3", "/tmp/run"):
        with pytest.raises(ValueError, match="models:/<name>@<alias>"):
            AliasWatcher(bad, None, lambda v: None)

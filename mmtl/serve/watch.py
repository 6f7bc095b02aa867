"""``mmtl serve models:/<name>@<alias> --watch-alias``: follow a registry alias (e.g. ``champion``, moved by
``mmtl retrain``) and redeploy when it points at another version.

:class:`AliasWatcher` polls the MLflow registry; on a move it calls ``redeploy(version)``. The serve command's
redeploy rebuilds the index for the new model first when one is served (an index refuses another model): the
shards listed in the old index's manifest are embedded again into ``<index>-v<version>`` by the Ray Data job,
then the application is redeployed in place (:func:`mmtl.serve.server.start`). If anything fails, the old
deployment keeps serving and the watcher tries again at the next poll.
"""
from __future__ import annotations

import re
from typing import Callable, Optional

_ALIAS = re.compile(r"^models:/([^/@]+)@([^/@]+)/?$")


def parse_alias(spec: str) -> tuple[str, str]:
    """``models:/<name>@<alias>`` -> ``(name, alias)``. Raises ValueError for any other MODEL form."""
    m = _ALIAS.match(spec.strip())
    if not m:
        raise ValueError(f"--watch-alias needs MODEL as models:/<name>@<alias>, got {spec!r}")
    return m.group(1), m.group(2)


def alias_version(spec: str, tracking_uri: Optional[str]) -> str:
    """The registry version ``models:/<name>@<alias>`` points at now (MlflowException when unknown)."""
    from mlflow.tracking import MlflowClient

    from mmtl.eval.resolve import mlflow_tracking_uri

    name, alias = parse_alias(spec)
    uri = mlflow_tracking_uri(tracking_uri)
    if not uri:
        raise ValueError("--watch-alias needs a tracking URI: pass --tracking-uri or set MLFLOW_TRACKING_URI")
    return str(MlflowClient(tracking_uri=uri, registry_uri=uri).get_model_version_by_alias(name, alias).version)


class AliasWatcher:
    """Polls ``spec``'s alias; :meth:`poll_once` calls ``redeploy(new_version)`` when it moved since the version
    served (``served``, default: the version at construction) and, when ``redeploy`` returns without raising,
    records the new version as served.

    Args:
        spec: ``models:/<name>@<alias>``. tracking_uri: registry (None: ``$MLFLOW_TRACKING_URI``).
        redeploy: called with the new version string; raise to keep the old deployment (retried next poll).
        say: progress / error messages.
    """

    def __init__(self, spec: str, tracking_uri: Optional[str], redeploy: Callable[[str], None],
                 served: Optional[str] = None, say: Callable[[str], None] = lambda m: None) -> None:
        parse_alias(spec)
        self.spec, self.tracking_uri, self.redeploy, self.say = spec, tracking_uri, redeploy, say
        self.served = served if served is not None else alias_version(spec, tracking_uri)

    def poll_once(self) -> bool:
        """True when the alias moved and the redeploy succeeded; False when unchanged or the redeploy failed
        (the error is reported through ``say``; the old deployment keeps serving)."""
        try:
            now = alias_version(self.spec, self.tracking_uri)
        except Exception as e:  # noqa: BLE001 (registry unreachable: keep serving, try again)
            self.say(f"cannot read {self.spec}: {e}")
            return False
        if now == self.served:
            return False
        self.say(f"{self.spec} moved from version {self.served} to {now}: redeploying")
        try:
            self.redeploy(now)
        except Exception as e:  # noqa: BLE001 (any failure: the old version keeps serving)
            self.say(f"redeploy of version {now} failed, still serving version {self.served}: {e}")
            return False
        self.served = now
        return True


def make_redeploy(spec: str, index_dir: Optional[str], say: Callable[[str], None] = lambda m: None,
                  **start_kwargs) -> Callable[[str], None]:
    """The serve command's ``redeploy(version)``: with an index, embed the shards of the current index's manifest
    with the new model into ``<index>-v<version>`` (Ray Data job, same kind) unless that folder already holds an
    index, then redeploy the application in place with it (:func:`mmtl.serve.server.start`, ``start_kwargs``:
    host, port, token, config, tracking_uri, ray_address). Raises what those raise."""
    import os
    from pathlib import Path

    state = {"index": index_dir}

    def redeploy(version: str) -> None:
        from mmtl.serve.server import start

        new_index = state["index"]
        if new_index:
            from mmtl.serve.index import read_manifest
            from mmtl.serve.index_build import build_index

            manifest = read_manifest(new_index)
            new_index = f"{re.sub(r'-v[0-9]+$', '', str(new_index).rstrip(os.sep))}-v{version}"
            if not (Path(new_index) / "index.json").exists():
                say(f"rebuilding the index for version {version} -> {new_index}")
                build_index(spec, [s["shard"] for s in manifest["shards"]], new_index, kind=manifest["kind"],
                            tracking_uri=start_kwargs.get("tracking_uri"), ray_address=start_kwargs.get("ray_address"),
                            say=say)
        start(spec, index_dir=new_index, say=say, **start_kwargs)
        state["index"] = new_index

    return redeploy

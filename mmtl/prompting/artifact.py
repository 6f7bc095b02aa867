"""The learned CoOp prompt as a small artifact, and zero-shot metrics with it on base / new classes.

Files (in a prompt_tuning run's ``export/`` folder, and in MLflow under ``prompt/``):

* ``prompt.safetensors``: one tensor ``ctx``, (M, D) class-shared or (C_base, M, D) class-specific;
* ``prompt.json``: ``classnames`` (the classes the context was trained on, label order), ``classes`` (all
  classes, base then new as configured), ``base_classes``, ``new_classes``, ``n_ctx``, ``init``,
  ``class_specific``, ``class_suffix``, ``family``, ``text_fingerprint`` (of the frozen text tower),
  ``embed_dim``, ``source`` (the CoOp paper).

Base-to-new protocol (CoOp / CoCoOp): "base" accuracy classifies base-class samples among the base classes only,
"new" accuracy new-class samples among the new classes only, "all" every sample among all classes.
Class-specific context has no vectors for new classes: those subsets are skipped with a reason, never guessed.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch

PROMPT_FILE = "prompt.safetensors"
PROMPT_META = "prompt.json"
SOURCE = "CoOp: Zhou, Yang, Loy & Liu, Learning to Prompt for Vision-Language Models, IJCV 2022"


def save_prompt(out_dir: str | Path, ctx: torch.Tensor, meta: dict) -> list[Path]:
    """Write ``prompt.safetensors`` (``ctx`` as float32) and ``prompt.json`` into ``out_dir``; returns both paths."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({"ctx": ctx.detach().float().cpu().contiguous()}, str(out / PROMPT_FILE))
    (out / PROMPT_META).write_text(json.dumps({**meta, "source": SOURCE}, indent=2) + "\n")
    return [out / PROMPT_FILE, out / PROMPT_META]


def find_prompt(path: str | Path) -> Optional[Path]:
    """The folder holding a prompt artifact: ``path`` itself (the .safetensors / .json file or its folder), its
    ``export/`` (a run directory) or ``prompt/``; None when there is none."""
    p = Path(path).expanduser()
    if p.is_file() and p.name in (PROMPT_FILE, PROMPT_META):
        p = p.parent
    for d in (p, p / "export", p / "prompt"):
        if (d / PROMPT_FILE).is_file() and (d / PROMPT_META).is_file():
            return d
    return None


class LoadedPrompt:
    """A saved prompt: ``ctx`` tensor and ``meta`` dict (see module docstring); :meth:`learner` rebuilds the
    :class:`~mmtl.prompting.coop.PromptLearner` for a model."""

    def __init__(self, path: str | Path) -> None:
        """Raises FileNotFoundError (no artifact at ``path``) or ValueError (unreadable / inconsistent files)."""
        from safetensors.torch import load_file

        d = find_prompt(path)
        if d is None:
            raise FileNotFoundError(f"no learned prompt at {path}: expected {PROMPT_FILE} + {PROMPT_META} (a "
                                    "prompt_tuning run directory, its export/ folder, or the files themselves)")
        self.dir = d
        try:
            self.meta = json.loads((d / PROMPT_META).read_text())
            self.ctx = load_file(str(d / PROMPT_FILE))["ctx"]
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"prompt artifact in {d} is unreadable: {type(e).__name__}: {e}") from None
        for key in ("classnames", "n_ctx", "class_specific"):
            if key not in self.meta:
                raise ValueError(f"{d / PROMPT_META} lacks {key!r}")

    @property
    def classnames(self) -> list[str]:
        return list(self.meta["classnames"])

    @property
    def class_specific(self) -> bool:
        return bool(self.meta["class_specific"])

    def default_classes(self) -> list[str]:
        """Classes to evaluate by default: all configured classes (shared context), the trained ones (specific)."""
        return self.classnames if self.class_specific else list(self.meta.get("classes") or self.classnames)

    def learner(self, model):
        """The :class:`~mmtl.prompting.coop.PromptLearner` of this prompt for ``model`` (eval mode).

        Raises:
            ValueError: the context's width does not match the model's token embeddings.
            NotImplementedError: unsupported model family.
        """
        from mmtl.prompting.coop import PromptLearner

        m = self.meta
        return PromptLearner(model, m["classnames"], m["n_ctx"], m.get("init"), m["class_specific"],
                             m.get("class_suffix", "."), ctx=self.ctx).eval()

    def describe(self, model=None) -> dict:
        out = {"dir": str(self.dir), **{k: self.meta.get(k) for k in
               ("n_ctx", "init", "class_specific", "class_suffix", "base_classes", "new_classes")}}
        if model is not None and self.meta.get("text_fingerprint"):
            out["text_fingerprint_match"] = self.meta["text_fingerprint"] == model.fingerprint("text")
        return out


def download_prompt(run_id: str, tracking_uri: str, dst: str | Path) -> Optional[Path]:
    """Download the MLflow artifact folder ``prompt/`` of ``run_id`` (logged by every prompt_tuning run) into
    ``dst``; returns the folder holding the prompt files, or None when the run has none."""
    import mlflow.artifacts
    from mlflow.tracking import MlflowClient

    names = {Path(f.path).name for f in MlflowClient(tracking_uri=tracking_uri).list_artifacts(run_id, "prompt")}
    if PROMPT_FILE not in names or PROMPT_META not in names:
        return None
    Path(dst).mkdir(parents=True, exist_ok=True)
    return find_prompt(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="prompt", dst_path=str(dst),
                                                           tracking_uri=tracking_uri))

"""The options of ``mmtl eval``, typed once: :class:`EvalOptions` (one field per command-line option, with its
flag and help in ``Annotated[..., Cli(...)]`` metadata). :mod:`mmtl.cli.eval` builds the command from these
fields, so the command line, its help and :func:`mmtl.eval.runner.run_eval` cannot drift apart.

Only the standard library (and the import-light task table) is imported here: building the CLI (``mmtl --help``) stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Callable, Optional

from mmtl.eval.args import EvalError
from mmtl.eval.registry import task_help


@dataclass(frozen=True)
class Cli:
    """How one option field appears on the command line (read by the CLI; no CLI library needed here).

    Attributes:
        help: the help text.
        flag: ``"--data"``, or ``"--mlflow/--no-mlflow"`` for a boolean on/off pair; None: a positional
            argument (named after the field).
    """

    help: str
    flag: Optional[str] = None


MODEL_HELP = "Run dir, export folder, runs:/<run_id>/model, models:/<name>@<alias> or models:/<name>/<version>"
PROMPT_HELP = ("Learned CoOp prompt for zero-shot: a prompt_tuning run dir, its export or prompt.safetensors "
               "(default: the model's own, if any)")


def parse_ks(ks: str) -> list[int]:
    """``"1,5,10"`` -> ``[1, 5, 10]`` (blank items skipped).

    Raises:
        EvalError: an item is not an integer.
    """
    try:
        return [int(k) for k in str(ks).split(",") if k.strip()]
    except ValueError:
        raise EvalError(f"--ks must be a comma list of integers, got {ks!r}") from None


@dataclass
class EvalOptions:
    """What a user chooses for ``mmtl eval`` (field order = help order). Semantics: :func:`~mmtl.eval.runner.run_eval`
    (``model`` is its ``spec``, ``ks`` the comma-list form of its ``ks``)."""

    model: Annotated[str, Cli(MODEL_HELP)]
    data: Annotated[str, Cli("Shard spec: folder, glob, brace pattern, .tar or URI", "--data")]
    task: Annotated[Optional[str], Cli(task_help() + "; default: picked from the data (a --label-field label: "
                                       "zero-shot, answers: vqa, else retrieval)", "--task")] = None
    classes: Annotated[Optional[str], Cli("Class names: a file (one a line) or a comma list", "--classes")] = None
    templates: Annotated[Optional[str], Cli("Prompt templates: a file (one a line, with {}) or one template",
                                            "--templates")] = None
    label_field: Annotated[str, Cli("Sample json field holding the class name", "--label-field")] = "category"
    ks: Annotated[str, Cli("Recall@K cut-offs for retrieval (comma list)", "--ks")] = "1,5,10"
    batch_size: Annotated[Optional[int], Cli("Images per forward pass (the model pipeline's eval.batch_size; "
                                             "default: its value there)", "--batch-size")] = None
    out_dir: Annotated[Optional[Path], Cli("Folder for eval.json and the CSV/PNG reports", "--out")] = None
    log_to_mlflow: Annotated[bool, Cli("Log to a run nested under the model's MLflow run",
                                       "--mlflow/--no-mlflow")] = True
    tracking_uri: Annotated[Optional[str], Cli("MLflow URI for runs:/ and models:/ (default $MLFLOW_TRACKING_URI)",
                                               "--tracking-uri")] = None
    use_ray: Annotated[Optional[bool], Cli("Force / forbid Ray Data batch inference (default: above 5,000 samples)",
                                           "--ray/--no-ray")] = None
    ray_address: Annotated[Optional[str], Cli("Ray address to join for the Ray path", "--address")] = None
    device: Annotated[str, Cli("auto, cpu or cuda", "--device")] = "auto"
    prompt: Annotated[Optional[str], Cli(PROMPT_HELP, "--prompt")] = None
    locale: Annotated[Optional[str], Cli("Retrieval per caption locale: xx, a comma list or all (en = the shards' "
                                         "captions; others captions.<locale>.json next to the shards)",
                                         "--locale")] = None

    def run(self, say: Optional[Callable[[str], None]] = None) -> dict:
        """:func:`~mmtl.eval.runner.run_eval` with these options; returns its report.

        Raises:
            EvalError: ``ks`` is not a comma list of integers (checked first), and as run_eval.
        """
        ks = parse_ks(self.ks)
        from mmtl.eval.runner import run_eval

        return run_eval(self.model, self.task, self.data, self.classes, self.templates, self.label_field, ks,
                        self.batch_size, str(self.out_dir) if self.out_dir else None, self.log_to_mlflow,
                        self.tracking_uri, use_ray=self.use_ray, ray_address=self.ray_address, device=self.device,
                        say=say, prompt=self.prompt, locale=self.locale)

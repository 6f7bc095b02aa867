"""The console filter: known library noise (lines captured from a real quickstart run) stays out of the terminal
but in the log file; everything else, including real warnings and tracebacks, passes."""
from __future__ import annotations

import io
import sys

import pytest

from mmtl.cli.console_log import NOISE, ConsoleLog, for_terminal, is_noise

CYAN, RESET = "\x1b[36m", "\x1b[0m"
# verbatim from a quickstart console (2026-11-30), one per NOISE entry
NOISY = [
    f"{CYAN}(PlacementGroupCleaner pid=29190){RESET} Failed to query Ray Train Controller actor state. State API may "
    "be temporarily unavailable. Continuing to monitor.",
    f"{CYAN}(PlacementGroupCleaner pid=7093){RESET} ConnectionError: Found multiple active Ray instances: "
    "{'127.0.0.1:34693', '127.0.0.1:38989'}.",
    f"{CYAN}(TrainController pid=29123){RESET} [2026-11-30 09:57:28,847 E 29123 29150] core_worker.cc:2465: Actor with "
    "class name: 'PreemptionWatcher' and ID: 'e992b073e5c95a71cd80c7db01000000' has constructor arguments in the "
    "object store and max_restarts > 0.",
    "[2026-11-30 09:54:18,443] [WARNING] [real_accelerator.py:213:get_accelerator] Setting accelerator to CPU. If you "
    "have GPU or other accelerator, we were unable to detect it.",
    "2026-11-30 09:54:20,756\tWARNING authentication_token_setup.py:85 -- Token authentication is enabled for this "
    "Ray cluster. Set RAY_AUTH_MODE=disabled to opt out.",
    f"{CYAN}(RayTrainWorker pid=29224){RESET} Reporting training result 1: TrainingReport(checkpoint=Checkpoint("
    "filesystem=local, path=/tmp/qs/train/checkpoint_2026-11-30_09-57-51.910937), metrics={'steps': 100}",
    f"{CYAN}(SplitCoordinator pid=29571){RESET} Progress bars disabled. To enable, set "
    "`ray.data.DataContext.get_current().enable_progress_bars = True`.",
    f"{CYAN}(SplitCoordinator pid=4464){RESET} \u2714\ufe0f  Dataset train_0356VK3u59EZlCv3nPSysf_0 execution finished "
    "in 2.24 seconds",
    "2026/11/30 09:54:17 INFO mlflow.store.db.utils: Creating initial MLflow database tables...",
    "Registered model 'mmtl-quickstart' already exists. Creating a new version of this model...",
    "Created version '1' of model 'mmtl-quickstart'.",
]
_REPORT = next(line for line in NOISY if "Reporting training result" in line)
KEPT = [
    "mmtl training: 2 workers, ZeRO-2, fp32, global batch 256, 300 steps",
    f"{CYAN}(RayTrainWorker pid=29224){RESET} Traceback (most recent call last):",
    f"{CYAN}(RayTrainWorker pid=29224){RESET} RuntimeError: shard emoji-train-000000.tar is corrupt",
    "[2026-11-30 09:54:18,443] [WARNING] [engine.py:1] Setting accelerator to XPU failed",
    "WARNING: the MLflow model reads /data/clip at load time",
]


def test_every_noise_entry_is_exercised_and_real_lines_pass():
    assert len(NOISY) == len(NOISE)
    for line in NOISY:
        assert is_noise(line) and for_terminal(line) is None, line
    for line in KEPT:
        assert not is_noise(line), line
        assert for_terminal(line) == line


def test_worker_progress_lines_lose_the_ray_prefix():
    line = f"{CYAN}(RayTrainWorker pid=29224){RESET} [mmtl] step 10/300 loss 4.9310 lr 5.50e-04 ETA 183s\n"
    assert for_terminal(line) == "mmtl step 10/300 loss 4.9310 lr 5.50e-04 ETA 183s\n"
    assert for_terminal("(RayTrainWorker pid=7, ip=10.0.0.2) [mmtl] step 1/2\n") == "mmtl step 1/2\n"


@pytest.mark.parametrize("verbose", [False, True])
def test_console_log_filters_terminal_and_keeps_everything_in_the_file(tmp_path, monkeypatch, verbose):
    term_out, term_err = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stdout", term_out)
    monkeypatch.setattr(sys, "stderr", term_err)
    monkeypatch.delenv("MMTL_VERBOSE", raising=False)
    with ConsoleLog(verbose=verbose) as log:
        print("mmtl run dir /tmp/x  mlflow run abc")  # before the log file exists: buffered
        print(NOISY[0], file=sys.stderr)  # print() writes text and "\n" in two calls
        log.attach(tmp_path / "run" / "console.log")
        sys.stderr.write("frozen features: 64sample\rfrozen features: 128sample\r")  # progress bar redraws
        sys.stderr.write(_REPORT[:40])
        sys.stderr.write(_REPORT[40:] + "\n" + KEPT[2] + "\n")
        print("no newline at the end", end="")
    assert (sys.stdout, sys.stderr) == (term_out, term_err)  # streams restored
    logged = (tmp_path / "run" / "console.log").read_text()
    assert "\x1b[" not in logged  # colours stripped in the file
    for text in ("mmtl run dir /tmp/x", "Failed to query Ray Train Controller", "Reporting training result 1",
                 "shard emoji-train-000000.tar is corrupt", "no newline at the end"):
        assert text in logged
    err = term_err.getvalue()
    assert "frozen features: 128sample\r" in err and "is corrupt" in err
    assert ("Failed to query" in err) is verbose and ("Reporting training result" in err) is verbose
    assert term_out.getvalue() == "mmtl run dir /tmp/x  mlflow run abc\nno newline at the end\n"


def test_verbose_from_environment(monkeypatch):
    monkeypatch.setenv("MMTL_VERBOSE", "1")
    assert ConsoleLog().verbose is True
    monkeypatch.setenv("MMTL_VERBOSE", "0")
    assert ConsoleLog().verbose is False



def test_say_and_fail_print_brackets_as_text(capsys):
    """Messages are plain text: ``features[train]`` keeps its ``[train]`` (rich markup would eat it)."""
    import typer

    from mmtl.cli.common import fail, say_to_console

    say_to_console()("features[train]: 1529 samples (61.2s); eval.sets=[test, cross_style]")
    with pytest.raises(typer.Exit) as exc:
        fail("eval.sets names [nope], not in data.test/val/extra_eval")
    assert exc.value.exit_code == 2
    err = capsys.readouterr().err
    assert "mmtl features[train]: 1529 samples (61.2s); eval.sets=[test, cross_style]" in err
    assert "error: eval.sets names [nope], not in" in err


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_quiet_run_prints_mmtl_lines_and_keeps_the_full_log(tiny_shards, tmp_path):
    """A real ``mmtl run`` in a subprocess (its own local Ray): the terminal has mmtl's lines and one-line
    copyable commands, no known noise; ``<run_dir>/console.log`` has the full stream and is in MLflow."""
    import os
    import subprocess

    import yaml
    from conftest import tiny_pipeline
    from mlflow.tracking import MlflowClient

    raw = tiny_pipeline(tiny_shards, tmp_path / "runs", train={"max_steps": 6, "checkpoint_every": 3},
                        tracking={"model_name": None})
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(raw))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MMTL_"))}
    env.update(RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", COLUMNS="60")
    p = subprocess.run([sys.executable, "-m", "mmtl.cli", "run", str(tmp_path / "tiny.yaml")], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=540)
    assert p.returncode == 0, p.stderr[-3000:]
    shown = p.stdout + p.stderr
    assert not [line for line in shown.splitlines() if is_noise(line)]
    assert "mmtl step 6/6" in shown and "(RayTrainWorker" not in shown
    ui = [line for line in shown.splitlines() if line.startswith("open the UI: ")]
    assert len(ui) == 1 and ui[0].rstrip().endswith("--port 5000")  # one copyable line, even at 60 columns
    run_dir = tmp_path / "runs" / "tiny"
    logged = (run_dir / "console.log").read_text()
    assert "[mmtl] step 6/6" in logged and "mmtl run dir" in logged
    state = yaml.safe_load((run_dir / "run.json").read_text())
    run_id = state["mlflow_run_id"]
    assert state["tracking_uri"] == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = MlflowClient(state["tracking_uri"])
    assert "console.log" in {a.path for a in client.list_artifacts(run_id)}

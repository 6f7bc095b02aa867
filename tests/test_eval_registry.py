"""The eval-task registry, the one recall@K, the one batched-encode helper, the one class-list resolution, and
`mmtl eval` built from EvalOptions (same options as before the CLI became a package). No Ray."""
from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from mmtl.data.batches import encode_batches
from mmtl.data.labels import distinct_labels, label_index, resolve_classes
from mmtl.eval.args import EvalError
from mmtl.eval.metrics import ranks, recall_at_k
from mmtl.eval.registry import (EMBEDDINGS, FUSION_TOKENS, TASKS, UnknownTaskError, evaluate_task, get_task,
                                set_metric_name, task_names)

# ----------------------------------------------------------------------------------------- registry


def test_registry_lists_the_tasks_and_what_they_need():
    from mmtl.eval.registry import GENERATED

    assert task_names() == ("zero-shot", "retrieval", "vqa", "itm", "captioning")
    assert {n: t.source for n, t in TASKS.items()} == {"zero-shot": EMBEDDINGS, "retrieval": EMBEDDINGS,
                                                       "vqa": FUSION_TOKENS, "itm": FUSION_TOKENS,
                                                       "captioning": GENERATED}
    assert get_task("captioning").needs == ("references", "generated")
    same = evaluate_task("captioning", references=["a red circle here"] * 2, generated=["a red circle here"] * 2)
    assert same["captioning/bleu4"] == pytest.approx(1.0, abs=1e-6) and same["captioning/exact_match"] == 1.0
    assert get_task("zero-shot").needs == ("image", "class_emb", "labels")
    assert get_task("retrieval").needs == ("image", "text", "ks") and get_task("retrieval").with_text
    assert not get_task("zero-shot").with_text
    assert get_task("vqa").needs == ("module", "tokens", "answers") and get_task("itm").needs == ("module", "tokens")
    assert get_task("zero-shot").report is not None and get_task("vqa").report is None


def test_unknown_task_is_rejected_with_the_known_names():
    with pytest.raises(UnknownTaskError, match=r"task must be one of zero-shot, retrieval, vqa, itm, captioning; got 'caption'"):
        get_task("caption")
    assert issubclass(UnknownTaskError, EvalError)  # the CLI maps it to exit code 2
    with pytest.raises(UnknownTaskError, match="got None"):
        evaluate_task(None)
    with pytest.raises(EvalError, match="task 'retrieval' needs image, text, ks; missing text, ks"):
        evaluate_task("retrieval", image=torch.eye(2))


def test_evaluate_task_metrics_and_training_names():
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [0, 0, 1], [0, 1, 0]])  # pairs 2 and 3 swapped
    r = evaluate_task("retrieval", image=img, text=txt, ks=[1, 2])
    assert r == {"retrieval/image_to_text_recall_at_1": pytest.approx(1 / 3),
                 "retrieval/image_to_text_recall_at_2": 1.0,
                 "retrieval/text_to_image_recall_at_1": pytest.approx(1 / 3),
                 "retrieval/text_to_image_recall_at_2": 1.0, "retrieval/num_samples": 3.0}
    z = evaluate_task("zero-shot", image=img, class_emb=torch.eye(3), labels=[0, 1, 1])
    assert z["zero_shot/acc1"] == pytest.approx(2 / 3) and z["zero_shot/num_classes"] == 3.0
    assert "zero_shot/acc5" not in z  # fewer than 5 classes
    assert set_metric_name("test", "retrieval/image_to_text_recall_at_1") == "test/image_to_text_recall_at_1"
    assert set_metric_name("val", "zero_shot/acc1") == "val/zero_shot_acc1"
    assert set_metric_name("test", "vqa/overall") == "test/vqa/overall"


def test_evaluate_sets_goes_through_the_registry_with_the_training_names():
    from types import SimpleNamespace

    from mmtl.eval.evaluate import EmbeddedSet, evaluate_sets

    class Text:
        def tokenize(self, prompts):
            ids = torch.tensor([[["red", "green"].index(p.split()[-1])] for p in prompts])
            return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

        def encode_text(self, ids, mask):
            return torch.eye(2)[ids[:, 0]]

    zs = SimpleNamespace(classes=None, label_field="c", templates=["a {}"])
    pipe = SimpleNamespace(eval=SimpleNamespace(recall_ks=[1, 5], zero_shot=zs))
    flipped = torch.eye(2).flip(0)  # image 0 looks green, image 1 red
    s = EmbeddedSet(flipped, flipped, [{"c": "red"}, {"c": "green"}])
    out = evaluate_sets(Text(), pipe, {"test": s})
    assert list(out) == ["test/image_to_text_recall_at_1", "test/text_to_image_recall_at_1", "test/num_samples",
                         "test/zero_shot_acc1", "test/zero_shot_mean_per_class_recall", "test/zero_shot_chance",
                         "test/zero_shot_majority", "test/zero_shot_num_classes", "test/zero_shot_num_samples"]
    assert out["test/image_to_text_recall_at_1"] == 1.0 and out["test/num_samples"] == 2.0
    assert out["test/zero_shot_num_classes"] == 2.0 and out["test/zero_shot_acc1"] == 0.0  # classes from the data


# ----------------------------------------------------------------------------------------- recall@K


def test_recall_at_k_against_a_hand_computed_similarity_matrix():
    # image i = e_i, so sim[i, j] = text_j[i]: the columns below are the (unit) text embeddings
    sim = torch.tensor([[1.0, 0.8, 0.0, 0.0],
                        [0.0, 0.6, 0.0, 0.0],
                        [0.0, 0.0, 0.6, 0.8],
                        [0.0, 0.0, 0.8, 0.6]])
    image, text = 3 * torch.eye(4), 0.5 * sim.t()  # scales do not matter: normalised inside
    # image -> text: row i, count of sim[i, j] > sim[i, i]: ranks 0, 0, 1, 1
    # text -> image: column j, count of sim[i, j] > sim[j, j]: ranks 0, 1 (0.8 > 0.6), 1, 1
    assert ranks(image, text).tolist() == [0, 0, 1, 1]
    assert ranks(text, image).tolist() == [0, 1, 1, 1]
    want = {"image_to_text_recall_at_1": 0.5, "image_to_text_recall_at_2": 1.0, "image_to_text_recall_at_9": 1.0,
            "text_to_image_recall_at_1": 0.25, "text_to_image_recall_at_2": 1.0, "text_to_image_recall_at_9": 1.0}
    assert recall_at_k(image, text, (1, 2, 9)) == want
    assert recall_at_k(image, text, (1, 2, 9), chunk=1) == want  # chunking changes nothing
    tie = recall_at_k(torch.tensor([[1.0, 0], [1.0, 0]]), torch.tensor([[1.0, 0], [1.0, 0]]), (1,))
    assert tie == {"image_to_text_recall_at_1": 1.0, "text_to_image_recall_at_1": 1.0}  # ties favour the truth
    with pytest.raises(ValueError, match="equal non-empty"):
        recall_at_k(torch.zeros(0, 2), torch.zeros(0, 2))


# ----------------------------------------------------------------------------------------- batched encode


@pytest.fixture(scope="module")
def tiny_images():
    import io

    from PIL import Image

    from conftest import synthetic_pair
    from mmtl.models import build_model, tiny_two_tower_config

    torch.manual_seed(0)
    model = build_model(tiny_two_tower_config()).eval()
    tf = model.image_transform(train=False)
    return model, [tf(Image.open(io.BytesIO(synthetic_pair(i)[0])).convert("RGB")) for i in range(7)]


@pytest.mark.parametrize("batch_size", [1, 3, 7])
def test_encode_batches_equals_encoding_all_at_once(tiny_images, batch_size):
    model, pixels = tiny_images
    with torch.no_grad():
        whole = model.encode_image(torch.stack(pixels))
        seen: list[int] = []
        out = list(encode_batches(iter(pixels), model.encode_image, batch_size, collate=torch.stack,
                                  progress=seen.append))
    sizes = [len(b) for b, _ in out]
    assert sizes == {1: [1] * 7, 3: [3, 3, 1], 7: [7]}[batch_size] and seen == sizes
    assert all(b[0] is pixels[sum(sizes[:i])] for i, (b, _) in enumerate(out))  # the items, in stream order
    torch.testing.assert_close(torch.cat([e for _, e in out]), whole, rtol=0, atol=1e-6)
    assert whole.shape == (7, model.embed_dim)


def test_encode_batches_empty_stream_and_bad_batch_size():
    calls = []
    assert list(encode_batches(iter(()), lambda b: calls.append(b), 4, progress=calls.append)) == []
    assert calls == []  # neither encode nor progress runs
    assert list(encode_batches(range(5), sum, 2)) == [([0, 1], 1), ([2, 3], 5), ([4], 4)]  # default collate: list
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        list(encode_batches(range(3), sum, 0))


# ----------------------------------------------------------------------------------------- classes


def test_resolve_classes_priority_and_data_fallback():
    meta = [{"y": "cat"}, {"y": "dog"}, {"y": None}, {"x": 1}, "not a dict", {"y": 1}, {"y": "1"}]
    assert distinct_labels(meta, "y") == ["1", "cat", "dog"]  # 1 and "1" are one class; null / missing skipped
    assert resolve_classes([("argument", None), ("pipeline", ["b", "a"])], meta, "y") == (["b", "a"], "pipeline")
    assert resolve_classes([("argument", ["x", "y"]), ("pipeline", ["b", "a"])], meta, "y") == (["x", "y"], "argument")
    assert resolve_classes([("pipeline", [])], meta, "y") == (["1", "cat", "dog"], "data")
    assert resolve_classes([], [{"y": "a"}], "y") == (["a"], "data")  # fewer than 2: the caller decides
    keep, labels, skipped = label_index([{"y": "dog"}, {"y": 0}, {"y": 7}, {}, {"y": "cow"}], "y", ["cat", "dog"])
    assert (keep, labels, dict(skipped)) == ([0, 1], [1, 0], {"unknown_class": 2, "no_label": 1})


# ----------------------------------------------------------------------------------------- mmtl eval CLI

# the parameters of `mmtl eval` (kind, flags, secondary flags, default, required, help), recorded from
# typer.main.get_command(app).commands["eval"].params: those of main before the CLI became a package, with the
# deliberate changes since: --task and --batch-size default from the data / the model's pipeline (issue 22),
# captioning in --task (issue 14), --locale (issue 15)
MAIN_EVAL_PARAMS = [
    ("argument", ("model",), (), None, True,
     "Run dir, export folder, runs:/<run_id>/model, models:/<name>@<alias> or models:/<name>/<version>"),
    ("option", ("--data",), (), None, True, "Shard spec: folder, glob, brace pattern, .tar or URI"),
    ("option", ("--task",), (), None, False, "zero-shot, retrieval, or vqa / itm (cross_attention models), or "
     "captioning (generative models); default: picked from the data (a --label-field label: zero-shot, answers: "
     "vqa, else retrieval)"),
    ("option", ("--classes",), (), None, False, "Class names: a file (one a line) or a comma list"),
    ("option", ("--templates",), (), None, False, "Prompt templates: a file (one a line, with {}) or one template"),
    ("option", ("--label-field",), (), "category", False, "Sample json field holding the class name"),
    ("option", ("--ks",), (), "1,5,10", False, "Recall@K cut-offs for retrieval (comma list)"),
    ("option", ("--batch-size",), (), None, False,
     "Images per forward pass (the model pipeline's eval.batch_size; default: its value there)"),
    ("option", ("--out",), (), None, False, "Folder for eval.json and the CSV/PNG reports"),
    ("option", ("--mlflow",), ("--no-mlflow",), True, False, "Log to a run nested under the model's MLflow run"),
    ("option", ("--tracking-uri",), (), None, False,
     "MLflow URI for runs:/ and models:/ (default $MLFLOW_TRACKING_URI)"),
    ("option", ("--ray",), ("--no-ray",), None, False,
     "Force / forbid Ray Data batch inference (default: above 5,000 samples)"),
    ("option", ("--address",), (), None, False, "Ray address to join for the Ray path"),
    ("option", ("--device",), (), "auto", False, "auto, cpu or cuda"),
    ("option", ("--json",), (), False, False, "Print one JSON object"),
    ("option", ("--prompt",), (), None, False, "Learned CoOp prompt for zero-shot: a prompt_tuning run dir, its "
     "export or prompt.safetensors (default: the model's own, if any)"),
    ("option", ("--locale",), (), None, False, "Retrieval per caption locale: xx, a comma list or all (en = the "
     "shards' captions; others captions.<locale>.json next to the shards)"),
]


def test_mmtl_eval_has_the_same_options_as_before():
    import typer.main

    from mmtl.cli import app

    cmd = typer.main.get_command(app).commands["eval"]
    got = [(p.param_type_name, tuple(p.opts), tuple(p.secondary_opts), p.default, p.required, p.help)
           for p in cmd.params]
    assert got == MAIN_EVAL_PARAMS
    res = CliRunner().invoke(app, ["eval", "--help"], env={"COLUMNS": "240"})
    assert res.exit_code == 0
    flags = [f for p in MAIN_EVAL_PARAMS if p[0] == "option" for f in p[1] + p[2]]
    assert all(f in res.output for f in flags)
    assert all(t in MAIN_EVAL_PARAMS[2][5] for t in task_names())  # --task help names every registered task


def test_mmtl_eval_usage_errors_exit_2_before_loading_anything(tmp_path):
    from mmtl.cli import app

    r = CliRunner().invoke(app, ["eval", str(tmp_path), "--data", str(tmp_path), "--ks", "1,x"])
    assert r.exit_code == 2 and "--ks must be a comma list of integers, got '1,x'" in r.output
    r = CliRunner().invoke(app, ["eval", str(tmp_path), "--data", str(tmp_path), "--task", "caption"])
    assert r.exit_code == 2 and "task must be one of zero-shot, retrieval, vqa, itm, captioning; got 'caption'" in " ".join(r.output.split())


def test_eval_options_map_onto_run_eval(monkeypatch):
    from mmtl.eval import runner
    from mmtl.eval.options import EvalOptions

    seen = {}
    monkeypatch.setattr(runner, "run_eval", lambda *a, **kw: seen.update(args=a, kw=kw) or {"ok": True})
    assert EvalOptions("m", "d", ks="1, 5,").run() == {"ok": True}
    assert seen["args"] == ("m", None, "d", None, None, "category", [1, 5], None, None, True, None)
    assert seen["kw"] == {"use_ray": None, "ray_address": None, "device": "auto", "say": None, "prompt": None,
                          "locale": None}

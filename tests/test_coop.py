"""CoOp prompt learning (``strategy.kind: prompt_tuning``, :mod:`mmtl.prompting`): gradients only in the
context, shapes, loss / accuracy / base-new metrics against hand computations, the prompt artifact, ``mmtl eval``
with a learned prompt, and one tiny ``mmtl run`` end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from mmtl.config import StrategyConfig
from mmtl.models import build_model
from mmtl.models.hf_clip import tiny_hf_clip_config
from mmtl.models.two_tower import tiny_two_tower_config
from mmtl.eval.prompt_eval import split_metrics
from mmtl.prompting.artifact import LoadedPrompt, save_prompt
from mmtl.prompting.coop import CoOpModule, PromptLearner, coop_logits
from mmtl.strategies import apply_strategy

NAMES = ["red", "green", "blue"]


@pytest.fixture(scope="module", params=["two_tower", "hf"])
def tiny_model(request):
    torch.manual_seed(0)
    cfg = tiny_two_tower_config() if request.param == "two_tower" else tiny_hf_clip_config()
    model = build_model(cfg)
    apply_strategy(model, StrategyConfig(kind="prompt_tuning"))
    return model.eval()


def test_only_context_gets_gradients(tiny_model):
    assert not any(p.requires_grad for p in tiny_model.parameters())
    mod = CoOpModule(tiny_model, PromptLearner(tiny_model, NAMES, n_ctx=4, init="a photo of a"))
    assert [n for n, p in mod.named_parameters() if p.requires_grad] == ["prompt_learner.ctx"]
    mod.train()
    assert not tiny_model.training  # frozen model stays in eval mode (no head dropout)
    loss = mod(image_feat=torch.randn(5, tiny_model.image_dim), label=torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    assert mod.prompt_learner.ctx.grad is not None and mod.prompt_learner.ctx.grad.abs().sum() > 0
    assert all(p.grad is None for p in tiny_model.parameters())
    assert 0.0 <= mod.metrics()["acc"] <= 1.0


def test_shared_and_class_specific_shapes(tiny_model):
    d = tiny_model.text_tower.get_input_embeddings().embedding_dim if tiny_model.cfg.family == "two_tower" \
        else tiny_model.text_tower.text_model.embeddings.token_embedding.embedding_dim
    shared = PromptLearner(tiny_model, NAMES, n_ctx=3, init=None)
    specific = PromptLearner(tiny_model, NAMES, n_ctx=3, init=None, class_specific=True)
    assert tuple(shared.ctx.shape) == (3, d)  # (M, D)
    assert tuple(specific.ctx.shape) == (3, 3, d)  # (C, M, D)
    assert abs(float(shared.ctx.detach().std()) - 0.02) < 0.01  # N(0, 0.02) as CoOp
    with torch.no_grad():
        assert tuple(shared(tiny_model).shape) == (3, tiny_model.embed_dim)
        assert tuple(specific.embed_classes(tiny_model, ["blue"]).shape) == (1, tiny_model.embed_dim)
        assert tuple(shared.embed_classes(tiny_model, ["a brand new class", "x"]).shape) == (2, tiny_model.embed_dim)
    with pytest.raises(ValueError, match="class_specific=false"):
        specific.embed_classes(tiny_model, ["purple"])
    with pytest.raises(ValueError, match="n_ctx=4"):
        PromptLearner(tiny_model, NAMES, n_ctx=2, init="a photo of a")  # 4 tokens


def test_init_phrase_equals_hand_written_template(tiny_model):
    """Untrained, the prompt with init "a photo of a" is exactly the text "a photo of a <class>."."""
    from mmtl.eval.evaluate import encode_prompts

    learner = PromptLearner(tiny_model, NAMES + ["T-shirt/top"], n_ctx=4, init="a photo of a")
    with torch.no_grad():
        got = learner(tiny_model)
        want = F.normalize(encode_prompts(tiny_model, [f"a photo of a {c}." for c in learner.classnames]), dim=-1)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_loss_and_accuracy_match_hand_computation():
    image = torch.tensor([[1.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    classes = torch.tensor([[3.0, 0.0], [0.0, 1.0]])
    logits = coop_logits(image, classes, torch.tensor([2.0]))
    r = 2 / math.sqrt(2)
    torch.testing.assert_close(logits, torch.tensor([[2.0, 0.0], [0.0, 2.0], [r, r]]))
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 1]))
    hand = (2 * math.log(1 + math.exp(-2)) + math.log(2)) / 3
    assert abs(float(loss) - hand) < 1e-6

    class Fixed(torch.nn.Module):  # a "model" whose projections are the identity, scale 2
        logit_scale = torch.nn.Parameter(torch.tensor([math.log(2.0)]))

        def project_image(self, x):
            return F.normalize(x, dim=-1)

        def scale(self):
            return self.logit_scale.exp()

    mod = CoOpModule.__new__(CoOpModule)
    torch.nn.Module.__init__(mod)
    mod.model, mod._acc = Fixed(), math.nan
    mod.prompt_learner = lambda model: classes
    assert abs(float(mod(image_feat=image, label=torch.tensor([0, 1, 1]))) - hand) < 1e-6
    assert mod.metrics()["acc"] == pytest.approx(2 / 3)  # the tie in row 3 goes to class 0


def test_base_new_metrics_match_hand_computation():
    classes = ["a", "b", "c", "d"]
    emb = {"a": [1.0, 0.0, 0.0], "b": [0.0, 1.0, 0.0], "c": [0.0, 0.0, 1.0], "d": [0.6, 0.0, 0.8]}
    image = torch.tensor([[1.0, 0.1, 0.0], [0.1, 1.0, 0.0], [0.0, 0.0, 1.0], [0.5, 0.0, 0.5], [0.9, 0.0, 0.1]])
    labels = [0, 1, 2, 3, 3]
    m, skipped = split_metrics(image, labels, classes, lambda n: torch.tensor([emb[c] for c in n]), ["a", "b"],
                               ["c", "d"])
    # all (4 classes): predictions a, b, c, d, a -> 4/5; base (a, b): 2/2; new (c, d): c, d, d -> 3/3
    assert m["all_acc1"] == pytest.approx(0.8)
    assert m["all_mean_per_class_recall"] == pytest.approx((1 + 1 + 1 + 0.5) / 4)
    assert m["base_acc1"] == 1.0 and m["base_num_samples"] == 2 and m["base_chance"] == 0.5
    assert m["new_acc1"] == 1.0 and m["new_num_samples"] == 3
    assert "all_acc5" not in m and not skipped and all("@" not in k for k in m)


def test_prompt_artifact_round_trip(tiny_model, tmp_path):
    learner = PromptLearner(tiny_model, NAMES, n_ctx=2, init=None, class_specific=True)
    with torch.no_grad():
        learner.ctx.add_(torch.randn_like(learner.ctx))
    files = save_prompt(tmp_path, learner.ctx, {"classnames": NAMES, "classes": NAMES + ["purple"],
                                                "base_classes": NAMES, "new_classes": ["purple"], "n_ctx": 2,
                                                "init": None, "class_specific": True, "class_suffix": "."})
    assert [f.name for f in files] == ["prompt.safetensors", "prompt.json"]
    loaded = LoadedPrompt(tmp_path / "prompt.safetensors")
    assert loaded.default_classes() == NAMES  # class-specific: only the trained classes
    with torch.no_grad():
        torch.testing.assert_close(loaded.learner(tiny_model)(tiny_model), learner(tiny_model))
    with pytest.raises(FileNotFoundError, match="no learned prompt"):
        LoadedPrompt(tmp_path / "nothing")


def _export_with_prompt(tmp_path, shards, class_specific: bool):
    """A tiny two-tower export folder (model.safetensors + pipeline.yaml) plus a learned prompt."""
    import yaml
    from safetensors.torch import save_file

    from conftest import tiny_pipeline
    from mmtl.config import build_pipeline

    pipe = build_pipeline(tiny_pipeline(shards, tmp_path / "runs"))
    torch.manual_seed(0)
    model = build_model(pipe.model).eval()
    exp = tmp_path / "export"
    exp.mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(exp / "model.safetensors"))
    (exp / "pipeline.yaml").write_text(yaml.safe_dump(pipe.model_dump(mode="json")))
    base, new = ["red", "green", "blue", "yellow"], ["purple", "orange", "black", "white"]
    learner = PromptLearner(model, base, n_ctx=2, init=None, class_specific=class_specific)
    save_prompt(exp, learner.ctx, {"classnames": base, "classes": base + new, "base_classes": base,
                                   "new_classes": new, "n_ctx": 2, "init": None, "class_specific": class_specific,
                                   "class_suffix": "."})
    return exp, model, learner, base + new


def test_mmtl_eval_uses_the_learned_prompt(tmp_path, tiny_shards):
    from mmtl.data.samples import CleanOptions
    from mmtl.eval.runner import EvalError, run_eval
    from mmtl.eval.evaluate import embed_shards
    from mmtl.eval.metrics import zero_shot_metrics
    from mmtl.eval.prompt_eval import subset_metrics

    exp, model, learner, classes = _export_with_prompt(tmp_path, tiny_shards, class_specific=False)
    rep = run_eval(str(exp), "zero-shot", tiny_shards["test"], label_field="color", log_to_mlflow=False,
                   use_ray=False, out_dir=str(tmp_path / "out"))
    assert rep["classes_from"] == "prompt" and rep["classes"] == classes
    s = embed_shards(model, tiny_shards["test"], CleanOptions())
    labels = [classes.index(m["color"]) for m in s.meta]
    with torch.no_grad():
        want = zero_shot_metrics(s.image, learner.embed_classes(model, classes), labels)
        base = subset_metrics(s.image, labels, classes, classes[:4], lambda n: learner.embed_classes(model, n))
    assert rep["metrics"]["zero_shot/acc1"] == pytest.approx(want["acc1"], abs=1e-6)
    assert rep["metrics"]["zero_shot/base_acc1"] == pytest.approx(base["acc1"], abs=1e-6)
    assert "zero_shot/new_acc1" in rep["metrics"] and rep["prompt"]["n_ctx"] == 2
    # the same prompt passed explicitly next to a plain export gives the same numbers
    plain = tmp_path / "plain"
    plain.mkdir()
    for f in ("model.safetensors", "pipeline.yaml"):
        (plain / f).write_bytes((exp / f).read_bytes())
    rep2 = run_eval(str(plain), "zero-shot", tiny_shards["test"], label_field="color", log_to_mlflow=False,
                    use_ray=False, prompt=str(exp / "prompt.safetensors"))
    assert rep2["metrics"]["zero_shot/acc1"] == rep["metrics"]["zero_shot/acc1"]
    with pytest.raises(EvalError, match="zero-shot only"):
        run_eval(str(plain), "retrieval", tiny_shards["test"], log_to_mlflow=False, prompt=str(exp))


def test_class_specific_prompt_refuses_new_classes(tmp_path, tiny_shards):
    from mmtl.eval.runner import EvalError, run_eval

    exp, *_ = _export_with_prompt(tmp_path, tiny_shards, class_specific=True)
    rep = run_eval(str(exp), "zero-shot", tiny_shards["test"], label_field="color", log_to_mlflow=False,
                   use_ray=False)  # default classes: the 4 trained ones; other samples are skipped
    assert rep["classes"] == ["red", "green", "blue", "yellow"] and rep["skipped"]["unknown_class"] > 0
    with pytest.raises(EvalError, match="no context for"):
        run_eval(str(exp), "zero-shot", tiny_shards["test"], classes="red,purple", label_field="color",
                 log_to_mlflow=False, use_ray=False)


@pytest.mark.e2e
def test_prompt_tuning_run_end_to_end(tmp_path, tiny_shards, ray_local):
    from conftest import tiny_pipeline
    from mmtl.cli import print_summary
    from mmtl.config import build_pipeline
    from mmtl.eval.runner import run_eval
    from mmtl.recipes import run_pipeline
    from mmtl.tracking.registry import load_exported

    raw = tiny_pipeline(tiny_shards, tmp_path / "runs", strategy={"kind": "prompt_tuning", "prompt": {
        "label_field": "color", "n_ctx": 2, "init": None,
        "base_classes": ["red", "green", "blue", "yellow"], "shots_per_class": 6}})
    raw["train"].update(max_steps=4, num_workers=1, micro_batch_size=8, checkpoint_every=4, lr=0.05)
    raw["tracking"].update(model_name=None, log_model=True)
    summary = run_pipeline(build_pipeline(raw), say=lambda m: None)
    assert summary["steps"] == 4 and summary["train_rows"] == 24
    assert summary["new_classes"] == ["black", "orange", "purple", "white"]  # sorted labels of data.train
    m = summary["metrics"]
    for key in ("test/zs_single_all_acc1", "test/zs_ensemble_base_acc1", "test/coop_all_acc1", "test/coop_base_acc1",
                "test/coop_new_acc1", "test/coop_new_chance", "train/acc"):
        assert key in m, key
    assert m["test/coop_base_chance"] == 0.25 and all("@" not in k for k in m)
    run_dir = tmp_path / "runs" / summary["run_name"]
    assert json.loads((run_dir / "summary.json").read_text())["metrics"] == m
    meta = json.loads((run_dir / "export" / "prompt.json").read_text())
    assert meta["ctx_shape"][0] == 2 and meta["classnames"] == ["red", "green", "blue", "yellow"]
    load_exported(run_dir / "export")  # the export is the plain frozen model (prompt split out)
    rep = run_eval(str(run_dir), "zero-shot", tiny_shards["test"], label_field="color", log_to_mlflow=False,
                   use_ray=False)
    assert rep["metrics"]["zero_shot/base_acc1"] == pytest.approx(m["test/coop_base_acc1"], abs=1e-5)
    assert rep["metrics"]["zero_shot/acc1"] == pytest.approx(m["test/coop_all_acc1"], abs=1e-5)
    print_summary(summary)
    # runs:/<id>/model: the logged model + the run's prompt/ artifacts
    uri_rep = run_eval(f"runs:/{summary['mlflow_run_id']}/model", "zero-shot", tiny_shards["test"], label_field="color",
                       log_to_mlflow=False, use_ray=False, tracking_uri=summary["mlflow_tracking_uri"])
    assert uri_rep["classes_from"] == "prompt" and uri_rep["prompt"]["n_ctx"] == 2
    assert uri_rep["metrics"]["zero_shot/acc1"] == pytest.approx(m["test/coop_all_acc1"], abs=1e-5)
    raw["tracking"]["log_model"] = False
    raw["strategy"]["prompt"]["zero_shot_only"] = True  # the fashion-zero-shot mode: baselines only, no Ray
    zs = run_pipeline(build_pipeline(raw), say=lambda m: None)
    assert zs["steps"] == 0 and zs["export_path"] is None and "test/coop_all_acc1" not in zs["metrics"]
    assert zs["metrics"]["test/zs_ensemble_new_acc1"] == m["test/zs_ensemble_new_acc1"]
    print_summary(zs)


@pytest.mark.parametrize("name", ["fashion-zero-shot", "fashion-coop", "emoji-coop"])
def test_prompt_pipelines_validate(name):
    """The CoOp pipelines keep meaning what the README table measured with them."""
    from pathlib import Path

    from mmtl.config import load_pipeline

    pipe = load_pipeline(Path(__file__).resolve().parents[1] / "pipelines" / f"{name}.yaml")
    p = pipe.strategy.prompt
    assert pipe.strategy.kind == "prompt_tuning" and pipe.model.family == "two_tower"
    assert pipe.model.init_from.endswith("runs/quickstart/export/model.safetensors")
    assert p.zero_shot_only == (name == "fashion-zero-shot")
    assert len(p.classes) == 10 and len(pipe.eval.zero_shot.templates) >= 4
    if name != "fashion-zero-shot":
        assert p.shots_per_class == 16 and p.n_ctx == 4 and p.init == "a photo of a" and not p.class_specific
    override = load_pipeline(Path(__file__).resolve().parents[1] / "pipelines" / "emoji-coop.yaml",
                             ["strategy.prompt.base_classes=[Activities,Animals & Nature,Flags,Food & Drink,Objects]"])
    assert override.strategy.prompt.base_classes[1] == "Animals & Nature"


def test_bad_init_fails_before_training(tmp_path, tiny_shards):
    from conftest import tiny_pipeline
    from mmtl.config import build_pipeline
    from mmtl.recipes import run_pipeline

    raw = tiny_pipeline(tiny_shards, tmp_path / "runs", strategy={"kind": "prompt_tuning", "prompt": {
        "label_field": "color", "n_ctx": 3, "init": "a photo of a"}})
    raw["eval"]["before_training"] = False
    with pytest.raises(ValueError, match="n_ctx=4"):
        run_pipeline(build_pipeline(raw), say=lambda m: None)

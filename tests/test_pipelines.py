"""The ready pipelines in ``pipelines/`` (one per seed application) must keep loading, keep meaning the
strategy / ZeRO stage / loss they document, and keep running end to end.

Each pipeline is run with its model swapped for the tiny random-init config of the same family and its data
pointed at the ``tiny_shards`` fixture; strategy, ZeRO stage, precision, loss, heads and the rest of
``train`` are the pipeline's own. That part is what these tests protect.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from mmtl.config import Pipeline, load_pipeline

PIPELINES_DIR = Path(__file__).resolve().parents[1] / "pipelines"

# What each pipeline is documented to do. If you change a pipeline's strategy, update this table knowingly.
EXPECT = {
    "product-search-lora": dict(family="open_clip", kind="lora", towers=["image", "text"], zero_stage=2,
                                loss="clip", cache=False),
    "radiology-retrieval": dict(family="two_tower", kind="frozen", lock="image", zero_stage=3, precision="bf16",
                                loss="clip", cache=False),
    "product-search-multilingual": dict(family="two_tower", kind="lora", towers=["text"], zero_stage=2, loss="clip",
                                        cache=False),
    "diagram-frozen": dict(family="two_tower", kind="frozen", lock="both", head="mlp", zero_stage=2,
                           loss="clip", cache=True),
}
NAMES = sorted(EXPECT)


def pipeline_path(name: str) -> Path:
    return PIPELINES_DIR / f"{name}.yaml"


def tiny_model_section(pipe: Pipeline) -> dict:
    """The tiny random-init model config of the pipeline's family, keeping the pipeline's head, head dropout
    and text pooling (everything else about the model is what the tiny config is for)."""
    from mmtl.models import tiny_hf_clip_config, tiny_open_clip_config, tiny_two_tower_config

    m = pipe.model
    keep = dict(head=m.head, head_dropout=m.head_dropout)
    if m.family == "open_clip":
        cfg = tiny_open_clip_config(**keep)
    elif m.family == "hf":
        cfg = tiny_hf_clip_config(**keep)
    else:
        text = tiny_two_tower_config().text.model_copy(update={"pooling": m.text.pooling})
        cfg = tiny_two_tower_config(text=text, **keep)
    return cfg.model_dump(mode="json")


def tiny_overrides(pipe: Pipeline, shards: dict, runs_root: Path) -> list[str]:
    """Dotted overrides: tiny model, tiny data, 3 steps on 1 CPU worker, no registry; nothing else."""
    return [
        f"model={json.dumps(tiny_model_section(pipe))}",
        f"data.train={shards['train']}", f"data.val={shards['val']}", f"data.test={shards['test']}",
        "data.extra_eval={}",
        "train.max_steps=3", "train.num_workers=1", "train.global_batch_size=null",
        "train.cpus_per_worker=0.5", "train.use_gpu=false",  # resources of the test machine
        f"train.runs_root={runs_root}",
        "eval.before_training=false", "eval.zero_shot=null",
        "tracking.model_name=null",
    ]


def load_tiny(name: str, shards: dict, runs_root: Path) -> Pipeline:
    pipe = load_pipeline(pipeline_path(name))
    return load_pipeline(pipeline_path(name), tiny_overrides(pipe, shards, runs_root))


def _placeholders(raw, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in raw.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_placeholders(v, key + "."))
        elif isinstance(v, str) and v.startswith("/path/to"):
            out[key] = v
    return out


# ---- (a) loads, validates, and matches what it documents ---------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_pipeline_validates_and_documents_its_paths(name):
    from typer.testing import CliRunner

    from mmtl.cli import app

    path = pipeline_path(name)
    res = CliRunner().invoke(app, ["config", str(path), "--allow-missing"])  # templates: placeholders
    assert res.exit_code == 0, res.output
    pipe = load_pipeline(path)
    exp = EXPECT[name]
    assert pipe.model.family == exp["family"]
    assert pipe.strategy.kind == exp["kind"]
    assert pipe.train.zero_stage == exp["zero_stage"] and pipe.train.loss == exp["loss"]
    for key in ("lock", "precision", "head"):
        if key in exp:
            section = {"lock": pipe.strategy, "precision": pipe.train, "head": pipe.model}[key]
            assert getattr(section, key) == exp[key], key
    if "towers" in exp:
        assert pipe.strategy.lora.towers == exp["towers"]
    assert pipe.eval.sets and all(getattr(pipe.data, s) for s in pipe.eval.sets)
    # every placeholder path is a key the header comment tells the user to change
    text = path.read_text()
    header = text[: text.index("\ndata:")]
    raw = yaml.safe_load(text)
    placeholders = _placeholders(raw)
    assert {"data.train", "data.test"} <= set(placeholders)
    for key in placeholders:
        assert key in header, f"{name}: placeholder {key} is not named in the header comment"


@pytest.mark.parametrize("name", NAMES)
def test_pipeline_model_fits_its_architecture(name):
    """The real (not tiny) architecture agrees with the pipeline's dims, without needing the weights."""
    pipe = load_pipeline(pipeline_path(name))
    m = pipe.model
    if m.family == "open_clip":
        from mmtl.models.open_clip_family import check_consistency, resolve_open_clip_config

        check_consistency(m, resolve_open_clip_config(m))
    elif m.family == "two_tower":
        import timm

        assert timm.is_model(m.vision.timm_name), m.vision.timm_name
        assert m.context_length <= 512  # BERT-style position embeddings


# ---- the strategy and trainable set each pipeline implies (tiny model, fast) ------------------------
@pytest.mark.parametrize("name", NAMES)
def test_pipeline_strategy_trainable_set(name, tmp_path):
    from mmtl.models import build_model
    from mmtl.strategies import apply_strategy, uses_feature_cache

    shards = {"train": "/x/train", "val": "/x/val", "test": "/x/test"}  # not read here
    pipe = load_tiny(name, shards, tmp_path)
    exp = EXPECT[name]
    assert pipe.strategy.kind == exp["kind"] and pipe.train.zero_stage == exp["zero_stage"]
    assert uses_feature_cache(pipe) is exp["cache"]
    model = build_model(pipe.model)
    summary = apply_strategy(model, pipe.strategy, zero_stage=pipe.train.zero_stage)
    assert 0 < summary["trainable_share"] < 1
    named = dict(model.named_parameters())
    trainable = {n for n, p in named.items() if p.requires_grad}
    tower = {"image": [n for n in named if n.startswith("image_tower.")],
             "text": [n for n in named if n.startswith("text_tower.")]}
    heads = {n for n in named if n.startswith(("image_head.", "text_head."))}
    assert heads <= trainable and "logit_scale" in trainable
    if name == "product-search-lora":
        assert all("lora_" in n or n in heads or n == "logit_scale" for n in trainable), trainable
        for which in ("image", "text"):
            lora = [n for n in tower[which] if "lora_" in n]
            assert lora and all(n in trainable for n in lora)
            assert not any(n in trainable for n in tower[which] if "lora_" not in n)
            # ZeRO-2 keeps LoRA on the attention (nn.MultiheadAttention) in the default targets
            modules = model.mmtl_lora["towers"][which]["modules"]
            assert any(m.endswith(".attn") for m in modules) and any(m.endswith("c_fc") for m in modules)
    elif name == "product-search-multilingual":  # LoRA in the text tower only, the image tower frozen
        assert not any(n in trainable for n in tower["image"])
        lora = [n for n in tower["text"] if "lora_" in n]
        assert lora and all(n in trainable for n in lora) and all(("query" in n or "value" in n) for n in lora)
        assert not any(n in trainable for n in tower["text"] if "lora_" not in n)
    elif name == "radiology-retrieval":  # LiT
        assert not any(n in trainable for n in tower["image"])
        assert tower["text"] and all(n in trainable for n in tower["text"])
    elif name == "diagram-frozen":
        assert trainable == heads | {"logit_scale"}
        assert sum(1 for mod in model.image_head.modules() if type(mod).__name__ == "Linear") == 2  # mlp


# ---- (b) tiny end-to-end run of each pipeline ---------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.parametrize("name", NAMES)
def test_pipeline_runs_end_to_end_tiny(name, ray_local, tiny_shards, tmp_path):
    import torch
    from safetensors.torch import load_file

    from mmtl.models import build_model
    from mmtl.recipes import run_pipeline
    from mmtl.strategies import apply_strategy
    from mmtl.train.loop import seed_everything

    pipe = load_tiny(name, tiny_shards, tmp_path / "runs")
    exp = EXPECT[name]
    assert (pipe.strategy.kind, pipe.train.zero_stage, pipe.train.loss) == (exp["kind"], exp["zero_stage"],
                                                                          exp["loss"])
    summary = run_pipeline(pipe, say=lambda m: None)
    assert summary["steps"] == 3
    assert summary["feature_cache"] is exp["cache"]
    loss = summary["metrics"]["train/loss"]
    assert math.isfinite(loss) and loss > 0
    assert "test/image_to_text_recall_at_1" in summary["metrics"]
    if pipe.eval.ridge_baseline:
        assert any(k.startswith("ridge/test/") for k in summary["metrics"])
    sd = load_file(summary["export_path"])
    assert not any("lora_" in k for k in sd)
    has_oc = (Path(summary["export_path"]).parent / "open_clip_model.safetensors").exists()
    assert has_oc == (pipe.model.family == "open_clip" and pipe.strategy.kind != "cross_attention")
    seed_everything(pipe.train.seed)  # the same init as the run's
    fresh = build_model(pipe.model)
    fresh.load_state_dict({k: v for k, v in sd.items() if k != "logit_bias"}, strict=True)  # plain model
    if pipe.strategy.kind == "lora":
        from mmtl.strategies.lora_peft import to_base_name

        adapter_dir = Path(summary["run_dir"]) / "adapter"
        adapter = load_file(str(adapter_dir / "adapter_model.safetensors"))  # a PEFT adapter: PEFT key names
        meta = json.loads((adapter_dir / "mmtl_adapter.json").read_text())
        for which, spec in meta["towers"].items():  # both towers adapted, under the PEFT base's names
            name = to_base_name(f"{which}_tower.{spec['modules'][0]}", meta["peft_base"]["prefixes"])
            assert any(k.startswith(f"base_model.model.{name}.lora_") for k in adapter), name
        assert set(meta["towers"]) == set(exp["towers"])
        assert any(float(v.abs().sum()) > 0 for k, v in adapter.items() if "lora_B" in k)
    else:  # frozen parts come back unchanged (up to the training precision's rounding)
        seed_everything(pipe.train.seed)
        init = build_model(pipe.model)
        apply_strategy(init, pipe.strategy, zero_stage=pipe.train.zero_stage)
        frozen = [n for n, p in init.named_parameters() if not p.requires_grad]
        assert frozen
        rtol = 2 ** -8 if pipe.train.precision != "fp32" else 1e-6  # bf16/fp16 keep 8/11 significant bits
        for n in frozen:
            torch.testing.assert_close(sd[n].float(), init.state_dict()[n].float(), rtol=rtol, atol=1e-6, msg=n)

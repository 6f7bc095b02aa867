"""Serving what is not an embedding model: a generative export answers /caption, a cross-attention export /vqa or
/itm, a prompt_tuning export classifies with its learned CoOp context. The replica class runs in process (no Ray
Serve: the routes are its methods), each answer compared with the model's own output."""
from __future__ import annotations

import asyncio
import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from fastapi import HTTPException

ROOT = Path(__file__).resolve().parents[1]


def _core(export_dir: Path, index_dir=None):
    from mmtl.serve.app import ServiceCore
    from mmtl.serve.config import load_serve_config
    from mmtl.serve.embed import model_fingerprint
    from mmtl.serve.served_model import export_files

    cfg = load_serve_config(None, {"deployment": {"num_cpus": 0.5, "torch_threads": 1}}).model_dump()
    info = {"spec": str(export_dir), "fingerprint": model_fingerprint(export_dir)}
    core = ServiceCore([export_files(export_dir)], info, index_dir, cfg, None)
    if core.emb is not None:  # serve.batch queues run only inside a Serve replica: encode one at a time here

        async def one_image(im):
            return core.emb.encode_images([im])[0]

        core._image_batch = one_image
    return core


def _b64png(color=(220, 30, 30)) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _status(coro) -> int:
    with pytest.raises(HTTPException) as e:
        asyncio.run(coro)
    return e.value.status_code


def _pipeline(shards, tmp_path, **sections):
    from conftest import tiny_pipeline

    from mmtl.config import build_pipeline

    return build_pipeline(tiny_pipeline(shards, tmp_path / "runs", **sections))


def test_generative_export_answers_caption_only(tmp_path, tiny_shards):
    from mmtl.models import build_model
    from mmtl.models.blip import tiny_blip_config
    from mmtl.serve.schemas import CaptionIn, EmbedTextIn
    from mmtl.tracking.caption_model import caption_images
    from mmtl.train.checkpoint import write_export

    pipe = _pipeline(tiny_shards, tmp_path, strategy={"kind": "frozen"})
    pipe = pipe.model_copy(update={"model": tiny_blip_config()})
    torch.manual_seed(0)
    model = build_model(pipe.model).eval()
    exp = write_export(tmp_path, {k: v.clone() for k, v in model.state_dict().items()}, pipe.to_yaml())
    core = _core(exp)
    assert core.model.kind == "generative" and core.emb is None
    ready = core.readyz()
    assert ready["serves"]["routes"] == ["/caption"] and ready["dim"] is None
    img = _b64png()
    got = asyncio.run(core.caption(CaptionIn(image=img, num_beams=2, max_new_tokens=5))).text
    want = caption_images(model, pipe, [core.model.decode(base64.b64decode(img))], None, 2, 5)[0]
    assert got == want and isinstance(got, str)
    assert _status(core.embed_text(EmbedTextIn(texts=["x"]))) == 409
    assert _status(core.caption(CaptionIn(image=base64.b64encode(b"not an image").decode()))) == 400
    with pytest.raises(ValueError, match="does not embed"):
        _core(exp, index_dir=str(tmp_path))


def _fusion_export(tmp_path, tiny_shards, task: str) -> tuple[Path, object]:
    from mmtl.config import build_pipeline
    from mmtl.fusion.task import FusionTaskModule
    from mmtl.models import build_model, tiny_two_tower_config
    from mmtl.train.checkpoint import write_export

    raw = yaml.safe_load((ROOT / "pipelines" / "diagram-vqa.yaml").read_text())
    raw["data"].update(train=tiny_shards["train"], test=tiny_shards["test"])
    raw["model"] = tiny_two_tower_config().model_dump(mode="json")
    raw["strategy"]["fusion"].update(task=task, n_heads=4, hidden=16, answers=["red", "blue", "two", "left"])
    raw["train"]["runs_root"] = str(tmp_path / "runs")
    pipe = build_pipeline(raw)
    torch.manual_seed(0)
    module = FusionTaskModule.from_pipeline(pipe, build_model(pipe.model)).eval()
    with torch.no_grad():  # tanh gates start at 0: open them so the fusion path matters for the check
        for name, p in module.named_parameters():
            if "gate" in name:
                p.fill_(0.5)
    sd = {(k[len("model."):] if k.startswith("model.") else k): v for k, v in module.state_dict().items()}
    return write_export(tmp_path / task, sd, pipe.to_yaml()), module


@pytest.mark.parametrize("task", ["vqa", "itm"])
def test_fusion_export_answers_its_task(tmp_path, tiny_shards, task):
    from mmtl.serve.schemas import CaptionIn, PairIn
    from mmtl.tracking.fusion_model import predict_rows

    exp, module = _fusion_export(tmp_path, tiny_shards, task)
    core = _core(exp)
    assert core.model.kind == "fusion" and core.readyz()["serves"]["routes"] == [f"/{task}"]
    img, q = _b64png((30, 30, 220)), "what colour is the shape?"
    want = predict_rows(core.model.fusion, core.model.pipe, [core.model.decode(base64.b64decode(img))], [q])
    if task == "vqa":
        got = asyncio.run(core.vqa(PairIn(image=img, text=q)))
        assert got.answer == want["answer"][0] and got.score == pytest.approx(want["score"][0], abs=1e-6)
        assert got.answer in ["red", "blue", "two", "left"] and 0 < got.score < 1
        assert _status(core.itm(PairIn(image=img, text=q))) == 409
    else:
        got = asyncio.run(core.itm(PairIn(image=img, text=q)))
        assert got.match_prob == pytest.approx(want["match_prob"][0], abs=1e-6)
        assert _status(core.vqa(PairIn(image=img, text=q))) == 409
    assert _status(core.caption(CaptionIn(image=img))) == 409
    with pytest.raises(ValueError):
        PairIn(image=img, text=" ")  # empty question: 422 at the API


@pytest.mark.parametrize("class_specific", [False, True])
def test_classify_uses_the_learned_prompt(tmp_path, tiny_shards, class_specific):
    from test_coop import _export_with_prompt

    from mmtl.serve.schemas import ClassifyIn

    exp, model, learner, classes = _export_with_prompt(tmp_path, tiny_shards, class_specific=class_specific)
    core = _core(exp)
    trained = ["red", "green", "blue", "yellow"]
    assert core.class_lists["prompt"] == (trained if class_specific else classes)
    assert core.readyz()["serves"]["learned_prompt"]["class_specific"] is class_specific
    img = _b64png()
    image_emb = core.emb.encode_images([core.model.decode(base64.b64decode(img))])[0]
    with torch.no_grad():
        w = torch.nn.functional.normalize(learner.embed_classes(model, trained), dim=-1).numpy()
    logits = (w @ image_emb) * core.emb.logit_scale()
    p = np.exp(logits - logits.max())
    p /= p.sum()
    r = asyncio.run(core.classify(ClassifyIn(image=img, classes=trained)))
    assert r.prompt == "learned"
    got = {x.label: x.prob for x in r.labels}
    np.testing.assert_allclose([got[c] for c in trained], p, atol=1e-5)
    r = asyncio.run(core.classify(ClassifyIn(image=img, classes="prompt")))
    assert len(r.labels) == len(core.class_lists["prompt"])
    plain = asyncio.run(core.classify(ClassifyIn(image=img, classes=trained, templates=["a {} shape"],
                                                 prompt="templates")))
    assert plain.prompt == "templates"
    w_t = core.emb.class_weights(trained, ["a {} shape"])
    assert plain.labels[0].label == trained[int(np.argmax(w_t @ image_emb))]
    if class_specific:  # no context for a class it was not trained on
        assert _status(core.classify(ClassifyIn(image=img, classes=["red", "purple"]))) == 422
    else:  # class-shared context: any class names
        r = asyncio.run(core.classify(ClassifyIn(image=img, classes=["purple", "orange"])))
        assert {x.label for x in r.labels} == {"purple", "orange"}


def test_learned_prompt_refused_without_one(tmp_path, tiny_shards):
    from mmtl.models import build_model
    from mmtl.serve.schemas import ClassifyIn
    from mmtl.train.checkpoint import write_export

    pipe = _pipeline(tiny_shards, tmp_path)
    exp = write_export(tmp_path, build_model(pipe.model).state_dict(), pipe.to_yaml())
    core = _core(exp)
    assert core.model.kind == "embedding" and "learned_prompt" not in core.readyz()["serves"]
    assert _status(core.classify(ClassifyIn(image=_b64png(), classes=["red", "blue"], prompt="learned"))) == 409
    r = asyncio.run(core.classify(ClassifyIn(image=_b64png(), classes=["red", "blue"])))
    assert r.prompt == "templates"


def test_search_by_vector_in_process(tmp_path, tiny_shards):
    """POST /search {"vector": ...}: a valid vector finds its row at cosine 1 (whatever its length); NaN, zero and
    another width are 422 naming the problem (never a -1 row id or a 500)."""
    from mmtl.models import build_model
    from mmtl.serve.embed import model_fingerprint
    from mmtl.serve.index import Rows, write_index
    from mmtl.serve.schemas import SearchIn
    from mmtl.train.checkpoint import write_export

    pipe = _pipeline(tiny_shards, tmp_path)
    torch.manual_seed(0)
    model = build_model(pipe.model).eval()
    exp = write_export(tmp_path, {k: v.clone() for k, v in model.state_dict().items()}, pipe.to_yaml())
    x = np.random.default_rng(0).standard_normal((4, 24)).astype(np.float32) * 50
    cols = {"key": list("abcd"), "uid": list("abcd"), "caption": list("abcd"), "shard": ["s"] * 4,
            "meta": ["{}"] * 4, "thumbnail": [b""] * 4}
    write_index(tmp_path / "idx", Rows(cols, x), model={"spec": "m", "kind": "export",
                                                        "fingerprint": model_fingerprint(exp)}, shards=[])
    core = _core(exp, str(tmp_path / "idx"))
    out = asyncio.run(core.search(SearchIn(vector=x[1].tolist(), top_k=4)))
    assert out.query == "vector" and out.results[0].key == "b" and out.results[0].score == pytest.approx(1, abs=1e-5)
    assert all(-1 - 1e-6 <= h.score <= 1 + 1e-6 for h in out.results)
    for vec, word in ((["NaN"] + [0.0] * 23, "NaN"), ([0.0] * 24, "all zeros"), (x[1, :23].tolist(), "23 dimensions")):
        with pytest.raises(HTTPException) as e:
            asyncio.run(core.search(SearchIn(vector=vec, top_k=3)))
        assert e.value.status_code == 422 and word in e.value.detail
    assert _status(core.search(SearchIn(vector=x[0].tolist(), text="red", top_k=3))) == 422  # exactly one query

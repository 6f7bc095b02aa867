"""The embedding index on disk: faiss vectors + parquet metadata + a JSON manifest naming the model.

Layout of an index folder::

    index.json                 manifest: format, model {spec, kind, fingerprint, ...}, kind (flat | hnsw),
                               dim, count, shards [{shard, samples, stats}], parts, recall (hnsw vs flat)
    index.faiss                faiss index over the L2-normalised image embeddings (row i = metadata row i)
    parts/part-NNNNN.parquet   one file per build / append: key, uid, caption, shard, meta (JSON text),
                               thumbnail (JPEG bytes), embedding (float32 list, kept to rebuild and to measure recall)

Scores are inner products of L2-normalised embeddings (cosine similarity, in [-1, 1]). ``flat`` is exact
(``faiss.IndexFlatIP``); ``hnsw`` is approximate (``faiss.IndexHNSWFlat``, Malkov & Yashunin 2018) and the
manifest records its recall@10 against the exact search (:func:`recall_vs_flat`).

Vectors are checked on the way in (:func:`clean_vectors`): each row is L2-normalised, rows with a NaN or an
infinity (``nonfinite_vector``) or of zero length (``zero_vector``) are skipped, counted and named by key in the
manifest's ``skipped``; queries are checked the same way (:func:`check_queries`: wrong width, non-finite or zero
is a ValueError naming the problem), so no score leaves [-1, 1] and no NaN row is ever returned.

A loaded index refuses a different model: :func:`load_index` raises :class:`IndexModelMismatch` when the
caller's model fingerprint (:func:`mmtl.serve.embed.model_fingerprint`) is not the one the index was built with.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

FORMAT = "mmtl-index/1"
KINDS = ("flat", "hnsw")
HNSW = {"M": 32, "ef_construction": 80, "ef_search": 64}
COLUMNS = ("key", "uid", "caption", "shard", "meta", "thumbnail")


class IndexFolderError(ValueError):
    """An index folder is missing, malformed or cannot take the requested change."""


class IndexModelMismatch(IndexFolderError):
    """The index was built with another model than the one offered (fingerprints differ)."""


def _faiss():
    import faiss

    return faiss


def new_faiss_index(kind: str, dim: int):
    """An empty faiss index over ``dim``-wide vectors, inner-product metric. Raises IndexFolderError for an unknown kind."""
    faiss = _faiss()
    if kind == "flat":
        return faiss.IndexFlatIP(dim)
    if kind == "hnsw":
        idx = faiss.IndexHNSWFlat(dim, HNSW["M"], faiss.METRIC_INNER_PRODUCT)
        idx.hnsw.efConstruction = HNSW["ef_construction"]
        idx.hnsw.efSearch = HNSW["ef_search"]
        return idx
    raise IndexFolderError(f"unknown index kind {kind!r}; expected one of {', '.join(KINDS)}")


def recall_vs_flat(index, vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Mean over ``queries`` (Q, D) of |top-k(index) ∩ top-k(exact)| / k, the exact top-k computed by brute force
    over ``vectors`` (N, D) (k is capped at N). 1.0 for an exact index."""
    k = min(k, len(vectors))
    if k == 0 or len(queries) == 0:
        return 1.0
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :k]
    _, approx = index.search(np.ascontiguousarray(queries, dtype=np.float32), k)
    hits = [len(set(a.tolist()) & set(e.tolist())) for a, e in zip(approx, exact)]
    return float(np.mean(hits) / k)


def clean_vectors(vectors: np.ndarray, keys: list[str]) -> tuple[np.ndarray, np.ndarray, dict[str, list[str]]]:
    """Rows fit for an inner-product index: ``(keep (N,) bool, (N, D) float32 L2-normalised (rows not kept are
    zero), {"nonfinite_vector": [keys], "zero_vector": [keys]})`` for (N, D) ``vectors`` and their N ``keys``.
    A NaN / infinity anywhere in a row, or a row of norm 0 (or too small to normalise in float32), is not kept."""
    x = np.asarray(vectors, dtype=np.float64)
    finite = np.isfinite(x).all(axis=1)
    norm = np.linalg.norm(np.where(finite[:, None], x, 0.0), axis=1)
    nonzero = norm > np.finfo(np.float32).tiny
    keep = finite & nonzero
    out = np.zeros(x.shape, np.float32)
    out[keep] = (x[keep] / norm[keep, None]).astype(np.float32)
    skipped = {"nonfinite_vector": [keys[i] for i in np.flatnonzero(~finite)],
               "zero_vector": [keys[i] for i in np.flatnonzero(finite & ~nonzero)]}
    return keep, out, {k: v for k, v in skipped.items() if v}


def check_queries(queries: np.ndarray, dim: int) -> np.ndarray:
    """(Q, D) queries -> float32 L2-normalised. Raises ValueError naming the problem: a width other than the
    index's ``dim``, a NaN / infinity, or a zero vector (it has no direction: every score would be 0)."""
    q = np.asarray(queries, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != dim:
        got = q.shape[-1] if q.ndim else 0
        raise ValueError(f"vector has {got} dimensions, the index has {dim}")
    if not np.isfinite(q).all():
        raise ValueError("vector has NaN or infinite values")
    norm = np.linalg.norm(q, axis=1, keepdims=True)
    if (norm <= np.finfo(np.float32).tiny).any():
        raise ValueError("vector is all zeros (no direction to search)")
    return np.ascontiguousarray(q / norm, dtype=np.float32)


@dataclass
class Rows:
    """What one build / append adds: per sample the metadata columns (:data:`COLUMNS`, lists of length N),
    ``image`` (N, D) float32 embeddings, ``text`` (N, D) caption embeddings (recall queries; not stored)."""

    columns: dict
    image: np.ndarray
    text: Optional[np.ndarray] = None

    def __len__(self) -> int:
        return int(self.image.shape[0])


def _write_part(folder: Path, n: int, rows: Rows) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = rows.image.shape[1]
    cols = {c: rows.columns[c] for c in COLUMNS}
    table = pa.table({**{c: pa.array(v, type=pa.binary() if c == "thumbnail" else pa.string())
                         for c, v in cols.items()},
                      "embedding": pa.FixedSizeListArray.from_arrays(pa.array(rows.image.reshape(-1), pa.float32()),
                                                                     dim)})
    name = f"parts/part-{n:05d}.parquet"
    (folder / "parts").mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / name)
    return name


def write_index(out: str | Path, rows: Rows, *, model: dict, kind: str = "flat", shards: list[dict],
                append: bool = False, recall_queries: int = 1000, seed: int = 0) -> dict:
    """Create (or with ``append`` extend) the index folder ``out``; returns the manifest written.

    Args:
        rows: the new samples (at least one clean: rows are L2-normalised, non-finite and zero rows skipped and
            named in the manifest's ``skipped``, :func:`clean_vectors`).
        model: ``{"spec", "kind", "fingerprint", ...}``; with ``append`` its fingerprint must equal the index's.
        kind: ``flat`` or ``hnsw`` (with ``append``: must match the existing kind, or be None to keep it).
        shards: per shard ``{"shard", "samples", "stats"}`` for the manifest.
        recall_queries: for ``hnsw``, up to this many caption embeddings of ``rows`` (image embeddings when no
            caption embeddings) query both the index and the exact search; the mean recall@10 goes to the manifest.

    Raises:
        IndexFolderError: no rows, an existing index without ``append`` (or a missing one with it), an unknown kind,
            a kind or width different from the existing index's, a shard already in the index.
        IndexModelMismatch: ``append`` with another model.
    """
    faiss = _faiss()
    out = Path(out)
    keep, unit, skipped = clean_vectors(rows.image, list(rows.columns["key"])) if len(rows) else (None, None, {})
    if skipped:
        idx = np.flatnonzero(keep)
        rows = Rows({c: [rows.columns[c][i] for i in idx] for c in COLUMNS}, unit[keep],
                    None if rows.text is None else rows.text[keep])
    elif len(rows):
        rows = Rows(rows.columns, unit, rows.text)
    if len(rows) == 0:
        raise IndexFolderError(f"no clean samples to index (skipped: {skipped or 'none given'})")
    dim = int(rows.image.shape[1])
    if append:
        manifest = read_manifest(out)
        check_model(manifest, model["fingerprint"], out)
        kind = kind or manifest["kind"]
        if kind != manifest["kind"] or dim != manifest["dim"]:
            raise IndexFolderError(f"{out} is a {manifest['kind']} index of width {manifest['dim']}; cannot append "
                              f"{kind} vectors of width {dim}")
        dup = sorted({s["shard"] for s in shards} & {s["shard"] for s in manifest["shards"]})
        if dup:
            raise IndexFolderError(f"shard(s) already in {out}: {', '.join(dup)}")
        index = faiss.read_index(str(out / "index.faiss"))
    else:
        if (out / "index.json").exists():
            raise IndexFolderError(f"{out} already holds an index: pass --append to add shards, or another --out")
        kind = kind or "flat"
        index = new_faiss_index(kind, dim)
        manifest = {"format": FORMAT, "kind": kind, "dim": dim, "model": model, "count": 0, "shards": [],
                    "parts": [], "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out.mkdir(parents=True, exist_ok=True)
    part = _write_part(out, len(manifest["parts"]), rows)
    index.add(np.ascontiguousarray(rows.image, dtype=np.float32))
    manifest["parts"].append(part)
    manifest["shards"] += shards
    manifest["count"] = int(index.ntotal)
    for reason, keys in skipped.items():
        manifest.setdefault("skipped", {}).setdefault(reason, []).extend(keys)
    manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    if kind == "hnsw":
        manifest["hnsw"] = dict(HNSW)
        allv = _all_embeddings(out, manifest["parts"])
        q = rows.text if rows.text is not None else rows.image
        q = q[np.random.default_rng(seed).permutation(len(q))[:recall_queries]]
        manifest["recall_at_10_vs_flat"] = round(recall_vs_flat(index, allv, q, 10), 4)
        manifest["recall_queries"] = int(len(q))
    faiss.write_index(index, str(out / "index.faiss"))
    (out / "index.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _all_embeddings(folder: Path, parts: list[str]) -> np.ndarray:
    import pyarrow.parquet as pq

    arrs = []
    for p in parts:
        col = pq.read_table(folder / p, columns=["embedding"]).column("embedding").combine_chunks()
        arrs.append(col.flatten().to_numpy().reshape(len(col), -1))
    return np.concatenate(arrs).astype(np.float32)


def read_manifest(folder: str | Path) -> dict:
    """The manifest of an index folder. Raises IndexFolderError when absent or not an mmtl index."""
    p = Path(folder) / "index.json"
    if not p.is_file():
        raise IndexFolderError(f"{folder} is not an index folder (no index.json): build one with `mmtl index build`")
    try:
        m = json.loads(p.read_text())
    except ValueError as e:
        raise IndexFolderError(f"{p} is not valid JSON: {e}") from None
    if m.get("format") != FORMAT:
        raise IndexFolderError(f"{p}: format {m.get('format')!r}, expected {FORMAT!r}")
    return m


def check_model(manifest: dict, fingerprint: str, where) -> None:
    """Raise IndexModelMismatch unless ``fingerprint`` is the index's model fingerprint."""
    want = manifest["model"]["fingerprint"]
    if fingerprint != want:
        raise IndexModelMismatch(
            f"index {where} was built with model {manifest['model'].get('spec')!r} (fingerprint {want[:12]}…); "
            f"the model offered has fingerprint {fingerprint[:12]}…: rebuild the index with this model "
            "(`mmtl index build MODEL SHARDS --out DIR`)")


class LoadedIndex:
    """An index in memory: ``faiss`` index, ``rows`` (list of dicts with :data:`COLUMNS`, ``meta`` parsed),
    ``manifest``. :meth:`search` takes (Q, D) float32 queries."""

    def __init__(self, folder: Path, manifest: dict, index, rows: list[dict]) -> None:
        self.folder, self.manifest, self.index, self.rows = folder, manifest, index, rows

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` rows per query (normalised first): ``(scores (Q, k) float32 cosine in [-1, 1], ids (Q, k)
        int64; -1 where an approximate index found fewer)``, best first. Raises ValueError for k outside
        [1, len(self)] or a bad query (:func:`check_queries`)."""
        if not 1 <= k <= len(self):
            raise ValueError(f"top_k must be between 1 and the index size {len(self)}, got {k}")
        return self.index.search(check_queries(queries, self.manifest["dim"]), k)

    def labels(self) -> dict[str, list[str]]:
        """Class lists known from the metadata: for each string-valued ``meta`` field with 2..1000 distinct
        values, the sorted values (e.g. ``category`` of the emoji set)."""
        vals: dict[str, set] = {}
        for r in self.rows:
            for k, v in r["meta"].items():
                if isinstance(v, str) and v.strip():
                    vals.setdefault(k, set()).add(v)
        return {k: sorted(v) for k, v in sorted(vals.items()) if 2 <= len(v) <= 1000}


def load_index(folder: str | Path, fingerprint: Optional[str] = None) -> LoadedIndex:
    """Load an index folder; with ``fingerprint``, refuse an index built with another model.

    Raises:
        IndexFolderError: not an index folder, or files missing / inconsistent (row count differs from the vectors).
        IndexModelMismatch: ``fingerprint`` differs from the manifest's.
    """
    import pyarrow.parquet as pq

    folder = Path(folder)
    manifest = read_manifest(folder)
    if fingerprint is not None:
        check_model(manifest, fingerprint, folder)
    index = _faiss().read_index(str(folder / "index.faiss"))
    if manifest["kind"] == "hnsw":
        index.hnsw.efSearch = manifest.get("hnsw", HNSW)["ef_search"]
    rows: list[dict] = []
    for p in manifest["parts"]:
        t = pq.read_table(folder / p, columns=list(COLUMNS)).to_pylist()
        for r in t:
            r["meta"] = json.loads(r["meta"] or "{}")
        rows += t
    if len(rows) != index.ntotal:
        raise IndexFolderError(f"{folder}: {len(rows)} metadata rows but {index.ntotal} vectors")
    return LoadedIndex(folder, manifest, index, rows)

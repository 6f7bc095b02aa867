"""The Ray Serve application: one deployment (:class:`MmtlService`) with a FastAPI ingress.

Routes (OpenAPI docs at ``/docs``): ``GET /`` (search page), ``GET /healthz`` (process alive), ``GET /readyz``
(model and index loaded: model spec and fingerprint, index size), ``POST /embed/text``, ``POST /embed/image``
(the image bytes as the body), ``POST /search``, ``POST /classify``, ``GET /classes`` for embedding models;
``POST /caption`` for generative models (``blip``, ``llava``); ``POST /vqa`` or ``POST /itm`` for cross-attention
fusion models (:mod:`mmtl.serve.served_model` says which export answers what; another route answers 409).

Text and image encodings go through ``ray.serve.batch`` queues, so concurrent requests share one forward pass
(size and wait from the config's ``batching``; disabled = batches of one). Bad requests are answered 4xx with a
message and never reach the model: wrong content type (415), body too large (413), malformed JSON or bad fields
(422), undecodable image bytes (400), an image over the pipeline's ``data.max_image_pixels`` (413), unknown
class list (404). With a token every route but ``/``, ``/healthz`` and ``/readyz`` needs
``Authorization: Bearer <token>`` (401 otherwise); the page itself holds no data and asks for the token.
"""
# no `from __future__ import annotations`: FastAPI reads the body models from real annotations of the routes
import asyncio
import base64
import hmac
import time
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve

from mmtl.serve.proxy import active_proxy
from mmtl.serve.schemas import (CaptionIn, CaptionOut, ClassifyIn, ClassifyOut, ClassScore, EmbeddingsOut,
                                EmbedTextIn, Hit, ItmOut, PairIn, SearchIn, SearchOut, VqaOut, b64_image)

api = FastAPI(title="mmtl serve", description="Embeddings, search, zero-shot classification, captions and answers "
                                             "with an mmtl model.")
OPEN_PATHS = ("/", "/healthz", "/readyz")
JSON_POSTS = ("/embed/text", "/search", "/classify", "/caption", "/vqa", "/itm")
IMAGE_TYPES = ("image/", "application/octet-stream")
_settings: dict = {"token": None, "max_body_bytes": 16 << 20}  # this replica's (one deployment per process)


def _replica_settings() -> dict:
    """``_settings`` of the imported module: Serve ships the ingress app to the replica by value (cloudpickle), so
    the middleware's own globals are a copy; the replica's ``__init__`` fills the real module's dict."""
    from mmtl.serve import app as module  # the real module, also from a by-value copy of this function

    return module._settings


@api.middleware("http")
async def _guard(request: Request, call_next):
    """Bearer token, content type and body size, checked before FastAPI parses anything."""
    path = request.url.path
    conf = _replica_settings()
    token = conf["token"]
    if token and path not in OPEN_PATHS:
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {token}".encode()):
            return JSONResponse({"detail": "missing or wrong bearer token"}, status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
    if request.method == "POST":
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if path in JSON_POSTS and ctype != "application/json":
            return JSONResponse({"detail": f"{path} takes application/json, got {ctype or 'no content type'!r}"},
                                status_code=415)
        if path == "/embed/image" and not ctype.startswith(IMAGE_TYPES):
            return JSONResponse({"detail": "/embed/image takes the image bytes as the body (image/* or "
                                           f"application/octet-stream), got {ctype or 'no content type'!r}"},
                                status_code=415)
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > conf["max_body_bytes"]):
            return JSONResponse({"detail": f"body of {length} bytes; at most {conf['max_body_bytes']}"},
                                status_code=413)
    return await call_next(request)


def _resolve_here(spec: str, tracking_uri: Optional[str]) -> dict:
    """Resolve MODEL in this replica: a local copy of the export (an MLflow download is kept for the replica's
    life) and its fingerprint; ``{"export_dir", "kind", "mlflow_run_id", "registered", "fingerprint"}``."""
    from mmtl.eval.resolve import resolve_export
    from mmtl.serve.embed import model_fingerprint

    res = resolve_export(spec, tracking_uri)
    return {"export_dir": res.export_dir, "kind": res.kind, "mlflow_run_id": res.mlflow_run_id,
            "registered": res.registered, "fingerprint": model_fingerprint(res.export_dir)}


@lru_cache(maxsize=1)
def _page() -> str:
    return (Path(__file__).with_name("page.html")).read_text()


class ServiceCore:
    """One replica (deployed as :data:`MmtlService`; a plain class, so it can run in process): the model
    (:class:`mmtl.serve.served_model.ServedModel`) and the index (:class:`LoadedIndex`) in memory.

    Args:
        files_box: the export's files (``[ObjectRef or dict]`` of :func:`mmtl.serve.served_model.export_files`),
            or None: the replica resolves ``model_info["spec"]`` itself (RayService).
        model_info: ``{"spec", "fingerprint", ...}`` shown by ``/readyz``.
        index_dir: index folder readable by the replica, or None (``/search`` then answers 409).
        settings: :class:`mmtl.serve.config.ServeConfig` as a dict; token: bearer token or None.

    Raises:
        ValueError: an index given for a model that does not embed. IndexModelMismatch: an index of another model.
    """

    def __init__(self, files_box: Optional[list], model_info: dict, index_dir: Optional[str], settings: dict,
                 token: Optional[str] = None) -> None:
        import ray

        from mmtl.serve.index import load_index
        from mmtl.serve.served_model import ServedModel

        threads = settings["deployment"]["torch_threads"]
        precision = settings["deployment"].get("text_precision", "fp32")
        if files_box is None:  # built by build_app (RayService): the replica resolves MODEL itself
            model_info = {**model_info, **_resolve_here(model_info["spec"], model_info.get("tracking_uri"))}
            self.model = ServedModel(model_info.pop("export_dir"), threads=threads, text_precision=precision)
            model_info.pop("temporary", None)
        else:
            ref = files_box[0]
            self.model = ServedModel.from_files(ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref, threads,
                                                precision)
        self.emb = self.model.embedder  # None unless the model embeds
        self.model_info, self.limits = model_info, settings["limits"]
        if index_dir and self.emb is None:
            raise ValueError(f"an index was given but the model ({self.model.kind}) does not embed images")
        self.index = load_index(index_dir, model_info["fingerprint"]) if index_dir else None
        self.class_lists = self.index.labels() if self.index is not None else {}
        if self.model.prompt_classes:
            self.class_lists = {**self.class_lists, "prompt": list(self.model.prompt_classes)}
        self.class_cache: dict = {}  # (classes, templates) -> (C, D) class embeddings, 16 most recent
        _replica_settings().update(token=token or None, max_body_bytes=self.limits["max_body_bytes"])
        b = settings["batching"]
        size = b["max_batch_size"] if b["enabled"] else 1
        for q in (self._text_batch, self._image_batch):
            q.set_max_batch_size(size)
            q.set_batch_wait_timeout_s(b["batch_wait_timeout_s"] if b["enabled"] else 0.0)
        self.batching = {"enabled": b["enabled"], "max_batch_size": size, "batch_wait_timeout_s": b["batch_wait_timeout_s"]}
        self.batches = {"text": [], "image": []}  # sizes of the last batches (readyz shows a summary)
        if self.emb is not None:
            self.emb.encode_texts(["warm up"])  # first forward pays one-off costs here, not in a request
        self.started = time.time()

    # ---- batched encoders ---------------------------------------------------------------------------------
    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _text_batch(self, texts: list[str]) -> list[np.ndarray]:
        self._count("text", len(texts))
        out = await asyncio.to_thread(self.emb.encode_texts, texts)
        return list(out)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)
    async def _image_batch(self, images: list) -> list[np.ndarray]:
        self._count("image", len(images))
        out = await asyncio.to_thread(self.emb.encode_images, images)
        return list(out)

    def _count(self, which: str, n: int) -> None:
        self.batches[which] = (self.batches[which] + [n])[-1000:]

    def _need(self, route: str) -> None:
        """409 unless the loaded model answers ``route``."""
        if route not in self.model.routes:
            m = self.model
            raise HTTPException(409, f"this model ({m.kind}: model.family={m.pipe.model.family}, strategy.kind="
                                     f"{m.pipe.strategy.kind}) does not answer {route}; it answers "
                                     f"{', '.join(m.routes)}")

    def _decode(self, data: bytes):
        from mmtl.data.samples import Reject, SampleRejected

        try:
            return self.model.decode(data)
        except SampleRejected as e:
            code = 413 if e.reason == Reject.TOO_MANY_PIXELS else 400
            raise HTTPException(code, f"image rejected ({e.reason.value}): {e.detail}"[:500]) from None
        except ValueError as e:
            raise HTTPException(400, f"image rejected: {e}"[:500]) from None

    def _image_field(self, s: str):
        try:
            data = b64_image(s)
        except ValueError as e:
            raise HTTPException(422, str(e)) from None
        return self._decode(data)

    # ---- routes -------------------------------------------------------------------------------------------
    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    def page(self) -> str:
        return _page()

    @api.get("/healthz")
    def healthz(self) -> dict:
        """The replica is up."""
        return {"status": "ok"}

    @api.get("/readyz")
    def readyz(self) -> dict:
        """Model and index loaded: what is served."""
        idx = None
        if self.index is not None:
            m = self.index.manifest
            idx = {"count": len(self.index), "kind": m["kind"], "dim": m["dim"], "folder": str(self.index.folder)}
        sizes = {k: (float(np.mean(v)) if v else None) for k, v in self.batches.items()}
        return {"ready": True, "model": self.model_info, "serves": self.model.describe(),
                "dim": self.emb.dim if self.emb is not None else None, "index": idx,
                "batching": {**self.batching, "mean_batch_size": sizes}, "class_lists": sorted(self.class_lists),
                "http_proxy": active_proxy(), "uptime_s": round(time.time() - self.started, 1)}

    @api.post("/embed/text", response_model=EmbeddingsOut)
    async def embed_text(self, body: EmbedTextIn) -> EmbeddingsOut:
        """Embed 1..64 texts -> (N, D) L2-normalised."""
        self._need("/embed/text")
        if len(body.texts) > self.limits["max_texts"]:
            raise HTTPException(422, f"{len(body.texts)} texts; at most {self.limits['max_texts']}")
        self._text_limit(body.texts)
        vecs = await asyncio.gather(*[self._text_batch(t) for t in body.texts])
        return EmbeddingsOut(dim=self.emb.dim, embeddings=[v.tolist() for v in vecs])

    @api.post("/embed/image", response_model=EmbeddingsOut)
    async def embed_image(self, request: Request) -> EmbeddingsOut:
        """Embed one image sent as the request body (any format the training decoder accepts)."""
        self._need("/embed/image")
        data = await request.body()
        if len(data) > self.limits["max_body_bytes"]:
            raise HTTPException(413, f"body of {len(data)} bytes; at most {self.limits['max_body_bytes']}")
        vec = await self._image_batch(self._decode(data))
        return EmbeddingsOut(dim=self.emb.dim, embeddings=[vec.tolist()])

    def _text_limit(self, texts) -> None:
        for t in texts:
            if len(t.encode("utf-8")) > self.limits["max_text_bytes"]:
                raise HTTPException(422, f"text query of {len(t.encode('utf-8'))} bytes; at most "
                                         f"{self.limits['max_text_bytes']}")

    @api.post("/search", response_model=SearchOut)
    async def search(self, body: SearchIn) -> SearchOut:
        """Top-K index rows for a text, an image or an embedding-vector query (exactly one of them); scores are
        cosine similarities in [-1, 1]."""
        self._need("/search")
        if self.index is None:
            raise HTTPException(409, "no index loaded: start the server with --index DIR (`mmtl index build`)")
        given = [k for k in ("text", "image", "vector") if getattr(body, k) is not None]
        if len(given) != 1:
            raise HTTPException(422, "give exactly one of 'text', 'image' and 'vector'")
        n = len(self.index)
        if not 1 <= body.top_k <= n:
            raise HTTPException(422, f"top_k must be between 1 and the index size {n}, got {body.top_k}")
        if body.text is not None:
            self._text_limit([body.text])
            q = await self._text_batch(body.text)
        elif body.image is not None:
            q = await self._image_batch(self._image_field(body.image))
        else:
            q = np.asarray(body.vector, dtype=np.float64)
        try:
            scores, ids = self.index.search(q[None, :], body.top_k)
        except ValueError as e:  # a vector query of another width, NaN / infinite or all zeros
            raise HTTPException(422, str(e)) from None
        hits = []
        for rank, (s, i) in enumerate(zip(scores[0], ids[0]), 1):
            if i < 0:  # an approximate index found fewer than top_k
                break
            r = self.index.rows[int(i)]
            thumb = ("data:image/jpeg;base64," + base64.b64encode(r["thumbnail"]).decode()) if body.thumbnails else None
            hits.append(Hit(rank=rank, score=float(s), key=r["key"], uid=r["uid"], caption=r["caption"],
                            shard=r["shard"], thumbnail=thumb))
        return SearchOut(query=given[0], top_k=body.top_k, index_size=n,
                         results=hits)

    @api.get("/classes")
    def classes(self) -> dict:
        """Class lists known from the index metadata (usable by name in /classify)."""
        return {k: v for k, v in self.class_lists.items()}

    @api.post("/classify", response_model=ClassifyOut)
    async def classify(self, body: ClassifyIn) -> ClassifyOut:
        """Zero-shot classification of an image among class names: CLIP prompt templates averaged, or the
        model's learned CoOp context (``prompt``; default: learned when the model has one)."""
        self._need("/classify")
        use = body.prompt or ("learned" if self.model.prompt is not None else "templates")
        if use == "learned" and self.model.prompt is None:
            raise HTTPException(409, "this model has no learned prompt (a prompt_tuning export has one); "
                                     "use prompt='templates'")
        if isinstance(body.classes, str):
            if body.classes not in self.class_lists:
                raise HTTPException(404, f"unknown class list {body.classes!r}; known: {sorted(self.class_lists)}")
            classes = self.class_lists[body.classes]
        else:
            classes = [c.strip() for c in body.classes]
        if len(classes) < 2 or any(not c for c in classes):
            raise HTTPException(422, "give at least 2 non-empty class names")
        if len(classes) > self.limits["max_classes"] or len(set(classes)) != len(classes):
            raise HTTPException(422, f"class names must be distinct and at most {self.limits['max_classes']}")
        self._text_limit(classes)
        img = await self._image_batch(self._image_field(body.image))
        if use == "learned":
            try:
                w = await asyncio.to_thread(self._learned_weights, tuple(classes))
            except ValueError as e:  # class-specific context and an untrained class
                raise HTTPException(422, str(e)[:500]) from None
        else:
            w = await asyncio.to_thread(self._class_weights, tuple(classes), tuple(body.templates))
        cos = w @ img
        logits = cos * self.emb.logit_scale()
        p = np.exp(logits - logits.max())
        p /= p.sum()
        order = np.argsort(-p)
        return ClassifyOut(labels=[ClassScore(label=classes[i], prob=float(p[i]), score=float(cos[i])) for i in order],
                           prompt=use)

    def _cached(self, key: tuple, make) -> np.ndarray:
        if key not in self.class_cache:
            if len(self.class_cache) >= 16:
                self.class_cache.pop(next(iter(self.class_cache)))
            self.class_cache[key] = make()
        return self.class_cache[key]

    def _class_weights(self, classes: tuple, templates: tuple) -> np.ndarray:
        return self._cached((classes, templates), lambda: self.emb.class_weights(classes, templates))

    def _learned_weights(self, classes: tuple) -> np.ndarray:
        return self._cached((classes, "<learned>"), lambda: self.model.learned_class_weights(classes))

    @api.post("/caption", response_model=CaptionOut)
    async def caption(self, body: CaptionIn) -> CaptionOut:
        """Generate a caption (or continue ``prompt``, e.g. answer a question) for one image; generative models.
        Requests are served one at a time per replica (no batching across requests)."""
        self._need("/caption")
        image = self._image_field(body.image)
        text = await asyncio.to_thread(self.model.caption, image, body.prompt, body.num_beams, body.max_new_tokens)
        return CaptionOut(text=text)

    @api.post("/vqa", response_model=VqaOut)
    async def vqa(self, body: PairIn) -> VqaOut:
        """Answer a question about one image from the trained answer vocabulary (cross-attention VQA models)."""
        self._need("/vqa")
        out = await asyncio.to_thread(self.model.fusion_predict, self._image_field(body.image), body.text)
        return VqaOut(**out)

    @api.post("/itm", response_model=ItmOut)
    async def itm(self, body: PairIn) -> ItmOut:
        """Probability that ``text`` describes the image (cross-attention ITM models)."""
        self._need("/itm")
        out = await asyncio.to_thread(self.model.fusion_predict, self._image_field(body.image), body.text)
        return ItmOut(**out)


#: The Ray Serve deployment: :class:`ServiceCore` behind the FastAPI ingress ``api``.
MmtlService = serve.deployment(name="mmtl")(serve.ingress(api)(ServiceCore))

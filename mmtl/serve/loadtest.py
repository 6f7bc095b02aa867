"""``mmtl bench serve``: a bounded load test of the serving app on 127.0.0.1 with a small asyncio + httpx client.

For batching on and off (``cluster/serve.yaml``'s ``batching``; off = batches of one), the app is started
(:func:`mmtl.serve.server.start`), warmed up, and for each route (``/search`` with text queries, ``/embed/image``
with images; with batching also ``GET /healthz``, the proxy + replica overhead without the model) and each
concurrency C a fixed number of requests is sent by C concurrent clients (closed loop: each
client sends its next request when the previous one is answered), stopping early at a time limit. Reported per
cell: requests done, errors, p50/p95/p99 latency (ms, client side, nearest-rank percentiles) and requests/s
(done / wall time). Queries are the index's captions; images are the index's JPEG thumbnails.
"""
from __future__ import annotations

import asyncio
import math
import time
from typing import Callable, Optional

ROUTES = ("search_text", "embed_image")
#: Baseline: the cost of a request through Serve's proxy and the replica without the model (GET /healthz).
BASELINE = "healthz"


def percentile(sorted_ms: list[float], q: float) -> float:
    """Nearest-rank percentile ``q`` in (0, 100] of an ascending list (NaN when empty)."""
    if not sorted_ms:
        return float("nan")
    return sorted_ms[max(0, math.ceil(q / 100 * len(sorted_ms)) - 1)]


async def _drive(url: str, make: Callable[[int], dict], n: int, concurrency: int, time_limit_s: float,
                 headers: dict) -> dict:
    import httpx

    lat: list[float] = []
    errors: dict[str, int] = {}
    next_i = 0
    deadline = time.perf_counter() + time_limit_s
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=url, timeout=max(30.0, time_limit_s), limits=limits, headers=headers) as c:
        async def client() -> None:
            nonlocal next_i
            while next_i < n and time.perf_counter() < deadline:
                i = next_i
                next_i += 1
                t = time.perf_counter()
                try:
                    r = await c.request(**{"method": "POST", **make(i)})
                    ok = r.status_code == 200
                    key = str(r.status_code)
                except httpx.HTTPError as e:
                    ok, key = False, type(e).__name__
                if ok:
                    lat.append((time.perf_counter() - t) * 1000)
                else:
                    errors[key] = errors.get(key, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*[client() for _ in range(concurrency)])
        wall = time.perf_counter() - t0
    lat.sort()
    return {"concurrency": concurrency, "requests": n, "done": len(lat), "errors": errors,
            "wall_s": round(wall, 2), "rps": round(len(lat) / wall, 2) if wall else 0.0,
            **{f"p{q}_ms": round(percentile(lat, q), 1) for q in (50, 95, 99)}}


def _requests(index_dir: str, top_k: int) -> dict[str, Callable[[int], dict]]:
    from mmtl.serve.index import load_index

    rows = load_index(index_dir).rows
    captions = [r["caption"] for r in rows]
    images = [r["thumbnail"] for r in rows[:: max(1, len(rows) // 64)]]
    return {
        BASELINE: lambda i: {"method": "GET", "url": "/healthz"},
        "search_text": lambda i: {"url": "/search", "json": {"text": captions[(i * 7919) % len(captions)],
                                                             "top_k": top_k}},
        "embed_image": lambda i: {"url": "/embed/image", "content": images[i % len(images)],
                                  "headers": {"content-type": "image/jpeg"}},
    }


def bench_serve(model: str, index_dir: str, *, requests: int = 200, concurrencies: tuple[int, ...] = (1, 8, 32),
                time_limit_s: float = 60.0, port: int = 8765, top_k: int = 10, config_path: Optional[str] = None,
                warmup: int = 16, say: Callable[[str], None] = lambda m: None) -> dict:
    """Run the load test (see the module docstring); starts and stops the app twice (batching on, off).

    Returns ``{"cells": [{batching, route, concurrency, done, errors, p50_ms, p95_ms, p99_ms, rps, ...}],
    "ratios": {"<batching>/<route>": rps(c=max)/rps(c=1)}, "targets": {...}, "setup": {...}}``.
    Raises what :func:`mmtl.serve.server.start` raises.
    """
    import os

    from mmtl.serve.config import load_serve_config
    from mmtl.serve.server import start, stop

    makers = _requests(index_dir, top_k)
    cells: list[dict] = []
    load = [round(x, 1) for x in os.getloadavg()]
    running = None
    served: dict = {}  # what the replicas report: HTTP proxy mode, text-tower precision
    mean_batch: dict = {}  # batching on/off -> mean batch size of the last 1000 batches per encoder (/readyz)
    try:
        for batching in (True, False):  # one Serve instance; the app is redeployed with the other setting
            cfg = load_serve_config(config_path, {"batching": {"enabled": batching}})
            say(f"deploying the app (batching {'on' if batching else 'off'})")
            running = start(model, index_dir=index_dir, port=port, token="", config=cfg)
            for route in ROUTES + ((BASELINE,) if batching else ()):
                asyncio.run(_drive(running.url, makers[route], warmup, 4, time_limit_s, {}))
                for c in concurrencies:
                    cell = asyncio.run(_drive(running.url, makers[route], requests, c, time_limit_s, {}))
                    cell.update(batching=batching, route=route)
                    cells.append(cell)
                    say(f"batching={'on' if batching else 'off'} {route} c={c}: {cell['done']}/{requests} in "
                        f"{cell['wall_s']} s, {cell['rps']} req/s, p50 {cell['p50_ms']} p95 {cell['p95_ms']} "
                        f"p99 {cell['p99_ms']} ms, errors {cell['errors'] or 0}")
            import httpx

            ready = httpx.get(f"{running.url}/readyz", timeout=30).json()
            mean_batch[("on" if batching else "off")] = ready["batching"]["mean_batch_size"]
            served = {"http_proxy": ready.get("http_proxy"), "text_precision": ready["serves"].get("text_precision")}
    finally:
        if running is not None:
            stop(running)
    lo, hi = min(concurrencies), max(concurrencies)
    by = {(x["batching"], x["route"], x["concurrency"]): x for x in cells}
    ratios = {f"{'batching' if b else 'no_batching'}/{r}": round(by[(b, r, hi)]["rps"] / max(by[(b, r, lo)]["rps"],
                                                                                              1e-9), 2)
              for b in (True, False) for r in ROUTES}
    targets = {}
    if 8 in concurrencies:
        p99 = by[(True, "search_text", 8)]["p99_ms"]
        targets["search_text p99 at c=8 <= 100 ms (batching)"] = {"value": p99, "met": bool(p99 <= 100)}
    targets[f"search_text rps c={hi} >= 3x c={lo} (batching)"] = {"value": ratios["batching/search_text"],
                                                                   "met": ratios["batching/search_text"] >= 3}
    return {"cells": cells, "ratios": ratios, "targets": targets, "mean_batch_size": mean_batch,
            "setup": {"model": model, "index": index_dir, "requests": requests, "time_limit_s": time_limit_s,
                      "top_k": top_k, "cpus": os.cpu_count(), "config": cfg.model_dump(), **served,
                      "loadavg_before": load, "loadavg_after": [round(x, 1) for x in os.getloadavg()]}}

"""`mmtl shards inspect`: read shards through exactly the training sample path and report.

The report counts accepted samples and rejections by reason, per shard and in total, and lists
fatal problems (missing shards, unsorted tars) under "errors" instead of raising, so one run
shows everything wrong with a dataset. With `dump_dir`, every accepted sample is written as the
cleaned RGB image (PNG, before any model transform) and its clean caption, for eyeballing.
"""
from __future__ import annotations

import collections
import os
from typing import Any, Optional, Union

from .samples import CleanOptions, Reject, Sample, SampleRejected
from .shardio import KeyCollisions, ShardError, iter_shard, resolve_shards, shard_ids

MAX_EXAMPLES = 20


def _dump(sample: Sample, dump_dir: str) -> None:
    stem = sample.uid.replace("/", "__").replace(os.sep, "__").replace("\0", "")
    if sample.image is not None:  # text-only samples have none
        sample.image.save(os.path.join(dump_dir, stem + ".png"), format="PNG")
    with open(os.path.join(dump_dir, stem + ".txt"), "w", encoding="utf-8") as f:
        f.write(sample.caption)


def _counts(stats: collections.Counter) -> dict[str, Any]:
    reasons = {r.value for r in Reject}
    return {
        "samples_ok": stats.get("samples_ok", 0),
        "rejected": {k: v for k, v in sorted(stats.items()) if k in reasons and v},
        "caption_truncated": stats.get("caption_truncated", 0),
    }


def inspect_shards(spec: Union[str, list], opts: CleanOptions, dump_dir: Optional[str] = None) -> dict:
    """Read every sample of `spec` (see `resolve_shards`) with `opts` and return a report.

    Returns a JSON-serialisable dict: "shards" (number resolved), "samples_ok", "rejected"
    ({reason value: count}, non-zero only), "caption_truncated", "errors" (fatal problems as
    strings: missing shards, empty dataset, unsorted or unreadable shard; the other shards are
    still read), "warnings" (empty/cut shards, key collisions across shards), "per_shard"
    ({shard: {"samples_ok", "rejected", "caption_truncated", "error"?}}) and "rejected_examples"
    (up to 20 of {"shard", "key", "reason", "detail"}). Never raises for bad data; `dump_dir` is
    created if needed (OSError if it cannot be written).
    """
    report: dict[str, Any] = {"shards": 0, "samples_ok": 0, "rejected": {}, "caption_truncated": 0,
                              "errors": [], "warnings": [], "per_shard": {}, "rejected_examples": []}
    try:
        shards = resolve_shards(spec)
    except ShardError as e:
        report["errors"].append(str(e))
        return report
    if dump_dir:
        os.makedirs(dump_dir, exist_ok=True)
    report["shards"] = len(shards)
    examples: list[dict[str, str]] = report["rejected_examples"]

    def on_reject(err: SampleRejected) -> None:
        if len(examples) < MAX_EXAMPLES:
            examples.append({"shard": err.shard, "key": err.key, "reason": err.reason.value, "detail": err.detail})

    total: collections.Counter = collections.Counter()
    keys = KeyCollisions()
    for i, (shard, sid) in enumerate(zip(shards, shard_ids(shards))):
        stats: collections.Counter = collections.Counter()
        entry: dict[str, Any] = {}
        try:
            for sample in iter_shard(shard, opts, stats, report["warnings"], shard_id=sid, on_reject=on_reject):
                keys.add(sample.key, i)
                if dump_dir:
                    _dump(sample, dump_dir)
        except ShardError as e:
            report["errors"].append(str(e))
            entry["error"] = str(e)
        except OSError as e:  # a shard vanishing or failing mid-read
            report["errors"].append(f"shard {shard}: {type(e).__name__}: {e}")
            entry["error"] = str(e)
        entry.update(_counts(stats))
        report["per_shard"][shard] = entry
        total.update(stats)
    msg = keys.warning()
    if msg:
        report["warnings"].append(msg)
    report.update(_counts(total))
    return report

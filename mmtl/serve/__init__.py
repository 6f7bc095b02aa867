"""Serving what was trained: an embedding index built by a Ray Data job (:mod:`mmtl.serve.index_build`,
:mod:`mmtl.serve.index`), a Ray Serve application with a FastAPI ingress (:mod:`mmtl.serve.app`) and its load
test (:mod:`mmtl.serve.loadtest`). Sits at the level of ``jobs`` / ``bench``: imports eval, tracking, data, models."""

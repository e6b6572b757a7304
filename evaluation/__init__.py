"""Evaluation: record outcomes, replay benchmarks against baselines, off-policy estimates.

* :mod:`~evaluation.record` — ``metallm record``: run every configured arm on a labeled
  dataset and write an outcomes file (resumable).
* :mod:`~evaluation.bench` — ``metallm bench``: stream an outcomes file through the
  router with delayed rewards, next to every baseline, with a λ sweep.
* :mod:`~evaluation.metrics` — accuracy, cost, regret, APGR, AIQ, cost at a target
  accuracy.
* :mod:`~evaluation.ope` — ``metallm evaluate --from-db``: IPS, self-normalised IPS and
  doubly robust estimates from the decisions table.
* :mod:`~evaluation.embed_cache` — query embeddings cached on disk per text and model.
"""

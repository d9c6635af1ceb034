"""Nearest-neighbour search and cross-domain retrieval metrics.

Embeddings are L2-normalised, so the inner product used everywhere here is the cosine
similarity. One module per concern:

  embeddings.py   `DomainEmbeddings` (one domain's ids, product ids, embeddings) and
                  the checks every input passes
  exact.py        exact blocked top-k in JAX
  index.py        the `Index` protocol, the table of index kinds, building an index
                  tuned to a recall target, saving and loading index folders
  scann_index.py  ScaNN (tree + anisotropic quantisation + exact reordering)
  faiss_index.py  faiss HNSW (optional: imported only when selected)
  tuning.py       the sweep choosing the cheapest search settings reaching the target
  metrics.py      exact R@K / median rank / mAP, one-shot accuracy, chance level,
                  R@K from a top-k list, recall of one top-k list against another
  directions.py   the metrics of every retrieval direction (metrics.json)
"""

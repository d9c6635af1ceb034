"""The base layer: what every other layer may import (data, models, training, jobs).

Its modules import only the standard library, NumPy, absl, ml_collections and tqdm:
never Grain, JAX models or the data code (tests/test_architecture.py checks it).
"""

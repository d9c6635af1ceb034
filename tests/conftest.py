"""Shared fixtures: a tiny synthetic ROPE directory and its prepared ArrayRecord shards.

Both are session-scoped and built once per test run (about two seconds together):

  tiny_rope_dir      `data_pipelines.synthetic` output (TINY_ROPE): 16 training and 8 test
                     products with about three pages, videos and lives each (some products
                     lack a domain), 4 frames per clip, 32x32 JPEGs, plus vocab.txt.
  tiny_prepared_dir  `data_pipelines.prepare` output for it (the `rope` TFDS dataset), with
                     TINY_NUM_SHARDS ArrayRecord files per split and domain.

Treat them as read-only: tests that modify data copy it or generate their own.
"""

import atexit
import glob
import importlib.util
import os
import shutil
import tempfile

# One persistent XLA compilation cache for the whole run, used in-process and by the
# subprocesses that tests start (they inherit the environment): many tests train the same
# tiny model, and a cache hit skips XLA's compilation of a step compiled before. Read by
# JAX when it initialises, like the flag below.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _cache_dir = tempfile.mkdtemp(prefix="cope_jax_tests_xla_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
  atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)

# Eight fake CPU devices for every in-process test, so that sharding tests never depend on
# which test file happened to start JAX first. Must be set before JAX initialises.
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=8").strip()

# libtpu (requirements-tpu.txt) is installed for the TPU compile tests, which compile for
# TPU topology descriptions on this host. Without TPU chips here, keep JAX from starting
# a TPU backend in every test process: it would fail (printing errors) and hold libtpu's
# one-process lock. ALLOW_MULTIPLE_LIBTPU_LOAD lets test processes, their subprocesses
# and concurrent runs load libtpu for topology descriptions side by side.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# (A host with a GPU plugin keeps JAX's own choice.)
if ("JAX_PLATFORMS" not in os.environ and importlib.util.find_spec("libtpu") is not None
    and not glob.glob("/dev/accel*") and not glob.glob("/dev/vfio/[0-9]*")
    and not any(importlib.util.find_spec(f"jax_cuda{v}_plugin") for v in (12, 13))):
  os.environ["JAX_PLATFORMS"] = "cpu"

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from data_pipelines import prepare
from data_pipelines import synthetic

TINY_ROPE = {"products": 16, "test_products": 8, "frames_per_clip": 4, "image_size": 32,
             "seed": 0}
TINY_NUM_SHARDS = 3


@pytest.fixture(scope="session")
def tiny_rope_dir(tmp_path_factory) -> str:
  out = tmp_path_factory.mktemp("tiny_rope")
  synthetic.generate(str(out), **TINY_ROPE)
  return str(out)


@pytest.fixture(scope="session")
def tiny_prepared_dir(tiny_rope_dir, tmp_path_factory) -> str:
  out = tmp_path_factory.mktemp("tiny_prepared")
  prepare.prepare(tiny_rope_dir, str(out), num_shards=TINY_NUM_SHARDS, progress=False,
                  log=lambda line: None)
  return str(out)

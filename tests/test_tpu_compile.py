"""TPU, without a TPU: the pinned libtpu, and the tiny step compiled for a TPU topology.

libtpu's compiler runs on this CPU host through `jax.experimental.topologies` topology
descriptions: steps are lowered over abstract arrays sharded on a mesh of those devices
and compiled for TPU, while the CPU stays the backend that runs everything else.
"""

import importlib.metadata
import pathlib
import re

from packaging.requirements import Requirement

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _pins(path: pathlib.Path) -> dict[str, str]:
  """name -> version of the `name==version` lines of a requirements file."""
  pins = {}
  for line in path.read_text().splitlines():
    match = re.match(r"\s*([A-Za-z0-9_.\-]+)==([^\s#;]+)", line)
    if match:
      pins[match.group(1).lower()] = match.group(2)
  return pins


def test_libtpu_pin_is_the_one_the_pinned_jax_asks_for():
  jax_pin = _pins(REPO_ROOT / "requirements.txt")["jax"]
  libtpu_pin = _pins(REPO_ROOT / "requirements-tpu.txt")["libtpu"]
  # The installed jax is the pinned one, so its metadata is the pin's.
  assert importlib.metadata.version("jax") == jax_pin
  tpu_extra = [Requirement(r) for r in importlib.metadata.requires("jax")
               if Requirement(r).name == "libtpu"
               and Requirement(r).marker is not None
               and Requirement(r).marker.evaluate({"extra": "tpu"})]
  assert tpu_extra, "jax declares no libtpu requirement for its [tpu] extra"
  for requirement in tpu_extra:
    assert requirement.specifier.contains(libtpu_pin), (
        f"requirements-tpu.txt pins libtpu=={libtpu_pin}; jax=={jax_pin}[tpu] asks for "
        f"libtpu{requirement.specifier}")
  assert importlib.metadata.version("libtpu") == libtpu_pin
  assert "-r requirements-tpu.txt" in (REPO_ROOT / "requirements-dev.txt").read_text()
  assert "libtpu" not in (REPO_ROOT / "requirements.txt").read_text()

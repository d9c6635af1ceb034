"""The layering rules of docs/architecture.md, checked on the source tree.

- The import graph of the library (`cope_jax`, `data_pipelines`, `configs`), counting
  imports inside functions too, has no cycle.
- Configs import nothing from the library.
- Each domain and each retrieval direction is defined once, in `cope_jax/base/domains.py`:
  no other library module spells the domain list, a direction, or branches on a domain
  name.
"""

import ast
import importlib
import pathlib
import re
import sys

import pytest

from cope_jax.base import domains

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("cope_jax", "data_pipelines", "configs")


def _module_name(path: pathlib.Path) -> str:
  parts = path.relative_to(ROOT).with_suffix("").parts
  return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _library_files():
  for package in PACKAGES:
    yield from sorted((ROOT / package).rglob("*.py"))


def _imports(path: pathlib.Path, modules: set[str]) -> set[str]:
  """Library modules `path` imports (anywhere in the file), resolved to module names."""
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
    else:
      continue
    for name in names:
      while name and name not in modules:
        name = name.rpartition(".")[0]
      if name:
        found.add(name)
  return found


def import_graph() -> dict[str, set[str]]:
  files = {_module_name(path): path for path in _library_files()}
  modules = set(files)
  graph = {}
  for module, path in files.items():
    # A package's __init__ is imported with any of its modules: not an edge of its own.
    graph[module] = {m for m in _imports(path, modules)
                     if m != module and not module.startswith(m + ".")}
  return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
  state: dict[str, str] = {}
  stack: list[str] = []

  def visit(node):
    state[node] = "open"
    stack.append(node)
    for successor in sorted(graph.get(node, ())):
      if state.get(successor) == "open":
        return stack[stack.index(successor):] + [successor]
      if successor not in state:
        cycle = visit(successor)
        if cycle:
          return cycle
    state[node] = "done"
    stack.pop()
    return None

  for node in sorted(graph):
    if node not in state:
      cycle = visit(node)
      if cycle:
        return cycle
  return None


def test_the_library_import_graph_is_acyclic():
  graph = import_graph()
  assert "cope_jax.train" in graph and "cope_jax.state" in graph["cope_jax.train"]
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_evaluation_and_export_do_not_depend_on_the_trainer():
  graph = import_graph()

  def reachable(start):
    seen, todo = set(), [start]
    while todo:
      for successor in graph[todo.pop()]:
        if successor not in seen:
          seen.add(successor)
          todo.append(successor)
    return seen

  for entry in ("cope_jax.evaluate", "cope_jax.export", "cope_jax.convert"):
    assert "cope_jax.train" not in reachable(entry), entry


def test_configs_import_nothing_from_the_library():
  for path in sorted((ROOT / "configs").glob("*.py")):
    imported = _imports(path, {"cope_jax", "data_pipelines"})
    assert not imported, f"{path.name} imports {sorted(imported)}"


def _library_sources():
  for path in _library_files():
    if path.parts[-2] == "configs" or path.name == "domains.py":
      continue
    yield path, path.read_text(encoding="utf-8")


_NAMES = "|".join(domains.NAMES)
SECOND_DEFINITIONS = {
    "domain list": re.compile(  # e.g. ("page", "video", "live")
        r"""\(\s*["'](%s)["']\s*,\s*["'](%s)["']""" % (_NAMES, _NAMES)),
    "direction": re.compile(r"""["'](%s)_to_(%s)["']""" % (_NAMES, _NAMES)),
    "branch on a domain name": re.compile(
        r"""(domain|query_domain|gallery_domain)\s*[!=]=\s*["'](%s)["']""" % _NAMES),
    "ROPE file kind": re.compile(r"""["']product_(pages|videos|lives)_pair["']"""),
}


def test_each_domain_and_direction_is_defined_once():
  found = [f"{path.relative_to(ROOT)}:{source[:match.start()].count(chr(10)) + 1}: {what}: "
           f"{match.group(0)}"
           for path, source in _library_sources()
           for what, pattern in SECOND_DEFINITIONS.items()
           for match in pattern.finditer(source)]
  assert not found, "\n".join(found)


@pytest.mark.parametrize("source, what", [
    ('DOMAINS = ("page", "video", "live")', "domain list"),
    ('if domain == "live":', "branch on a domain name"),
    ('name = "video_to_page"', "direction"),
    ('pair = "product_lives_pair"', "ROPE file kind"),
])
def test_the_definition_check_catches_a_second_definition(source, what):
  assert SECOND_DEFINITIONS[what].search(source)
  assert not any(pattern.search('domain = domains.get("x")')
                 for pattern in SECOND_DEFINITIONS.values())


def test_directions_are_every_ordered_pair_of_domains():
  assert len(domains.DIRECTIONS) == len(domains.NAMES) * (len(domains.NAMES) - 1)
  assert set(domains.DIRECTIONS) == {(a, b) for a in domains.NAMES for b in domains.NAMES
                                     if a != b}
  assert domains.DIRECTION_NAMES[:2] == ("page_to_video", "video_to_page")


def test_the_trainer_imports_no_evaluator_module():
  """Evaluators come from `config.evals`: the trainer may use the package's scheduling,
  never a module of a particular evaluator, and no evaluator imports the trainer."""
  graph = import_graph()
  evaluator_modules = {m for m in graph if m.startswith("cope_jax.evaluators.")}
  assert {"cope_jax.evaluators.retrieval", "cope_jax.evaluators.one_shot"} <= evaluator_modules
  assert not graph["cope_jax.train"] & evaluator_modules
  for module in evaluator_modules | {"cope_jax.evaluators"}:
    assert "cope_jax.train" not in graph[module], module


def test_the_export_format_is_read_and_written_in_one_module():
  """Only `cope_jax/export_format.py` touches the export's Parquet files and manifest
  (as only `release_format.py` touches the release's text files)."""
  offenders = []
  for path in sorted((ROOT / "cope_jax").rglob("*.py")):
    if path.name == "export_format.py":
      continue
    source = path.read_text(encoding="utf-8")
    if re.search(r"^\s*import pyarrow\.parquet|^\s*from pyarrow import parquet", source, re.M):
      offenders.append(f"{path.relative_to(ROOT)}: imports pyarrow.parquet")
    if re.search(r"^MANIFEST_FILE\s*=", source, re.M):
      offenders.append(f"{path.relative_to(ROOT)}: defines MANIFEST_FILE")
  assert not offenders, offenders


# ---- the layers of docs/architecture.md, lowest first ----------------------------------
# A module imports from its own layer or a lower one; "data" and "model" are side by side
# above the base (neither imports the other). Functions' own imports count too.
JOB_MODULES = ("cope_jax.train", "cope_jax.evaluate", "cope_jax.export", "cope_jax.convert",
               "cope_jax.compare", "cope_jax.report", "cope_jax.serving",
               "cope_jax.embed_beam", "cope_jax.cli", "cope_jax.distributed",
               "cope_jax.stderr_filter")
MODEL_MODULES = ("cope_jax.models", "cope_jax.losses", "cope_jax.optim", "cope_jax.sharding",
                 "cope_jax.search", "cope_jax.augment", "cope_jax.flops")
MAY_IMPORT = {
    "base": {"base"},
    "data": {"base", "data"},
    "model": {"base", "model"},
    "run": {"base", "data", "model", "run"},
    "jobs": {"base", "data", "model", "run", "jobs"},
    "testing": {"base", "data", "model", "run", "jobs", "testing", "configs"},
    "configs": {"configs"},
}
# What the base may import besides the standard library and itself.
BASE_THIRD_PARTY = {"numpy", "absl", "ml_collections", "tqdm"}


def _within(module: str, prefixes) -> bool:
  return any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes)


def layer_of(module: str) -> str:
  if module == "cope_jax" or _within(module, ("cope_jax.base",)):
    return "base"
  if _within(module, ("data_pipelines",)):
    return "data"
  if _within(module, ("configs",)):
    return "configs"
  if _within(module, ("cope_jax.testing",)):
    return "testing"
  if _within(module, MODEL_MODULES):
    return "model"
  if _within(module, JOB_MODULES):
    return "jobs"
  return "run"


def test_every_import_keeps_the_layer_order():
  graph = import_graph()
  against = [f"{module} ({layer_of(module)}) imports {imported} ({layer_of(imported)})"
             for module, imported_modules in sorted(graph.items())
             for imported in sorted(imported_modules)
             if layer_of(imported) not in MAY_IMPORT[layer_of(module)]]
  assert not against, "\n".join(against)


def test_the_layer_check_catches_an_import_against_the_order():
  assert layer_of("cope_jax.models.cope") == "model" and layer_of("data_pipelines.prepare") == "data"
  assert "data" not in MAY_IMPORT["model"] and "model" not in MAY_IMPORT["data"]
  assert "run" not in MAY_IMPORT["base"] and "jobs" not in MAY_IMPORT["run"]
  assert layer_of("cope_jax.base.domains") == "base" and layer_of("cope_jax.state") == "run"


def _third_party_imports(path: pathlib.Path) -> set[str]:
  found = set()
  for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
    if isinstance(node, ast.Import):
      found |= {alias.name.split(".")[0] for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      found.add(node.module.split(".")[0])
  return found - set(sys.stdlib_module_names) - {"__future__", "cope_jax"}


def test_the_base_pulls_in_no_framework():
  """The base is importable by every layer: no JAX, Grain, TFDS or model code."""
  for path in sorted((ROOT / "cope_jax" / "base").glob("*.py")):
    extra = _third_party_imports(path) - BASE_THIRD_PARTY
    assert not extra, f"{path.relative_to(ROOT)} imports {sorted(extra)}"


def test_state_and_augment_do_not_import_the_pipelines_or_grain():
  graph = import_graph()
  for module in ("cope_jax.state", "cope_jax.augment"):
    assert "data_pipelines.pipelines" not in graph[module], module
    path = ROOT / (module.replace(".", "/") + ".py")
    assert "grain" not in _third_party_imports(path), module


def test_no_benchmark_imports_the_tests():
  for path in sorted((ROOT / "benchmarks").rglob("*.py")):
    imported = _imports(path, {"tests"})
    assert not imported, f"{path.relative_to(ROOT)} imports {sorted(imported)}"


def test_every_library_module_imports():
  """Every module of the library imports (the quick tier runs this too, so that it
  covers every module)."""
  failed = []
  for module in sorted(import_graph()):
    try:
      importlib.import_module(module)
    except Exception as error:  # pylint: disable=broad-except
      failed.append(f"{module}: {type(error).__name__}: {error}")
  assert not failed, "\n".join(failed)

"""The README and docs/ hold together: links resolve, the set-up commands stay.

Checks every relative markdown link of README.md and docs/*.md (the file, and the
heading a `#fragment` names, by GitHub's rule for heading anchors), that every
`python -m <module>` they show names a module of this repository, and that the README
keeps the two set-up commands that CI runs.
"""

from __future__ import annotations

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages linked before they are written; an entry goes once the page exists.
PAGES_TO_COME: set[str] = set()
SETUP_COMMANDS = """```bash
bash scripts/demo.sh        # the main job on the built-in synthetic data
bash scripts/test.sh        # the test suite
```"""
README_MAX_LINES = 200

_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")
_FENCE = re.compile(r"^```.*?^```", re.M | re.S)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_MODULE = re.compile(r"python -m ((?:cope_jax|data_pipelines|benchmarks)(?:\.\w+)+)")


def heading_anchors(text: str) -> set[str]:
  """The anchors GitHub gives a page's headings (repeats get -1, -2, ...)."""
  anchors: set[str] = set()
  for line in _FENCE.sub("", text).splitlines():
    match = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
    if not match:
      continue
    slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
    candidate, repeat = slug, 0
    while candidate in anchors:
      repeat += 1
      candidate = f"{slug}-{repeat}"
    anchors.add(candidate)
  return anchors


def relative_links(text: str) -> list[str]:
  """Link targets outside code, without web addresses and mail links."""
  prose = _CODE_SPAN.sub("", _FENCE.sub("", text))
  return [target for target in _LINK.findall(prose)
          if not re.match(r"[a-z][a-z0-9+.-]*:", target)]


def test_heading_anchors_follow_githubs_rule():
  text = ("# cope-jax\n## What a run's folder holds\n## Kill -9 soak\n"
          "## Prepared data (`data_pipelines/prepare.py`)\n## Notes\n## Notes\n"
          "```\n# not a heading\n```\n")
  assert heading_anchors(text) == {
      "cope-jax", "what-a-runs-folder-holds", "kill--9-soak",
      "prepared-data-data_pipelinespreparepy", "notes", "notes-1"}


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_relative_links_resolve(page):
  broken = []
  for target in relative_links(page.read_text(encoding="utf-8")):
    path, _, fragment = target.partition("#")
    file = (page.parent / path).resolve() if path else page
    name = file.relative_to(ROOT).as_posix() if file.is_relative_to(ROOT) else str(file)
    if not file.exists():
      if name not in PAGES_TO_COME:
        broken.append(f"{target}: no file {name}")
      continue
    if fragment and file.suffix == ".md":
      if fragment not in heading_anchors(file.read_text(encoding="utf-8")):
        broken.append(f"{target}: {name} has no heading with the anchor #{fragment}")
  assert not broken, f"{page.relative_to(ROOT)}: " + "; ".join(broken)


@pytest.mark.parametrize("page", PAGES, ids=lambda page: page.name)
def test_commands_name_existing_modules(page):
  missing = []
  for module in sorted(set(_MODULE.findall(page.read_text(encoding="utf-8")))):
    path = ROOT.joinpath(*module.split("."))
    if not (path.with_suffix(".py").is_file() or (path / "__main__.py").is_file()):
      missing.append(module)
  assert not missing, f"{page.relative_to(ROOT)} runs modules that do not exist: {missing}"


def test_pages_to_come_are_linked_from_the_readme():
  # An entry of PAGES_TO_COME that nothing links is stale.
  linked = {target.partition("#")[0]
            for target in relative_links((ROOT / "README.md").read_text(encoding="utf-8"))}
  for name in PAGES_TO_COME:
    assert name in linked, f"{name} is listed as to come but the README does not link it"


def test_readme_is_a_front_door():
  readme = (ROOT / "README.md").read_text(encoding="utf-8")
  assert SETUP_COMMANDS in readme
  # CI runs exactly the README's test command.
  assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
  lines = readme.splitlines()
  assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines"
  # The set-up commands are on the first screen.
  assert readme.index(SETUP_COMMANDS) < len("\n".join(lines[:40]))
  # Every page of docs/ is in the README's table.
  linked = {target.partition("#")[0] for target in relative_links(readme)}
  unlisted = [page.relative_to(ROOT).as_posix() for page in PAGES[1:]
              if page.relative_to(ROOT).as_posix() not in linked]
  assert not unlisted, f"docs pages the README does not link: {unlisted}"

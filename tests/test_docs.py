"""The repository explains itself: every documentation reference in the code resolves.

* no old-style section citation ("SPEC §…", which a reader cannot follow) is left in ``src``;
* every ``docs/<file>.md#<anchor>`` cited in ``src`` names an existing file and one of its
  headings (GitHub's anchor slugs);
* links between the pages of ``docs/`` resolve the same way;
* each baseline module cites its own entry of ``docs/baselines.md``;
* README.md links the documentation index.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
DOCS = ROOT / "docs"
CITATION = re.compile(r"docs/([\w./-]+\.md)(?:#([\w-]+))?")
MD_LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$")


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: markup dropped, lower-cased, punctuation removed
    (letters, digits, ``_`` and ``-`` stay), spaces turned into hyphens."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # link text only
    text = re.sub(r"[`*]", "", text).strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Anchors of a Markdown file's headings (duplicates get GitHub's -1, -2 … suffixes)."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    in_code = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            in_code = not in_code
            continue
        match = None if in_code else HEADING.match(line)
        if match:
            slug = github_slug(match.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def source_files() -> list[Path]:
    return sorted(SRC.rglob("*.py"))


def src_citations() -> list[tuple[Path, int, str, str | None]]:
    """(file, line, docs page, anchor or None) of every ``docs/…md#…`` cited in ``src``."""
    found = []
    for path in source_files():
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in CITATION.finditer(line):
                found.append((path, lineno, match.group(1), match.group(2)))
    return found


def test_github_slug_rules():
    assert github_slug("Re-rotation") == "re-rotation"
    assert github_slug("The training objective") == "the-training-objective"
    assert github_slug("`cache_blend` (CacheBlend)") == "cache_blend-cacheblend"
    assert github_slug("Where our protocol differs from the paper's, and why") == \
        "where-our-protocol-differs-from-the-papers-and-why"


def test_no_spec_section_citations_in_src():
    hits = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}"
            for p in source_files()
            for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
            if "SPEC §" in line]
    assert not hits, "cite docs/<page>.md#<anchor> instead of SPEC §…:\n" + "\n".join(hits)


def test_src_cites_the_docs():
    pages = {page for _, _, page, _ in src_citations()}
    assert {"method.md", "baselines.md", "protocol.md"} <= pages, pages


def test_every_docs_citation_in_src_resolves():
    bad = []
    for path, lineno, page, anchor in src_citations():
        target = DOCS / page
        where = f"{path.relative_to(ROOT)}:{lineno}: docs/{page}" + (f"#{anchor}" if anchor else "")
        if not target.is_file():
            bad.append(f"{where} (no such file)")
        elif anchor is not None and anchor not in anchors(target):
            bad.append(f"{where} (no heading with that anchor; have {sorted(anchors(target))})")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")) or ["<none>"])
def test_links_between_docs_pages_resolve(page):
    path = DOCS / page
    assert path.is_file(), "docs/ has no Markdown pages"
    bad = []
    for link in MD_LINK.findall(path.read_text(encoding="utf-8")):
        if re.match(r"[a-z]+:", link):  # http:, https:, mailto:
            continue
        file, _, anchor = link.partition("#")
        target = (path.parent / file).resolve() if file else path
        if not target.exists():
            bad.append(f"{link} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in anchors(target):
            bad.append(f"{link} (no such heading in {target.name})")
    assert not bad, f"docs/{page}: " + "; ".join(bad)


BASELINES = ["no_cache", "full_recompute", "no_recompute", "kv_packet", "cache_blend", "epic",
             "a3", "sam_kv", "rand_recompute"]


@pytest.mark.parametrize("name", BASELINES)
def test_each_method_module_cites_its_docs_entry(name):
    text = (SRC / "kvp" / "methods" / f"{name}.py").read_text(encoding="utf-8")
    docstring = text.split('"""')[1]
    assert "docs/baselines.md#" in docstring, f"methods/{name}.py does not cite docs/baselines.md"


def test_readme_links_the_documentation():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "](docs/README.md)" in readme or "](docs/)" in readme, \
        "README.md needs a link to docs/README.md"
    assert (DOCS / "README.md").is_file()

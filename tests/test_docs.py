"""The documentation stands alone: every citation of docs/*.md points at a file and a section that exist."""

import re
from pathlib import Path

import nbformat

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
LINK = re.compile(r"((?:\.\./)*(?:docs/)?[\w-]+\.md)?#([\w-]+)")


def slugs(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats numbered."""
    seen: dict[str, int] = {}
    out, fenced = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if fenced or not re.match(r"#{1,6} ", line):
            continue
        slug = re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
        out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
        seen[slug] = seen.get(slug, 0) + 1
    return out


def texts():
    """(path, text) of every file that may cite the docs: sources, tests, notebooks, README, docs, references."""
    paths = [*REPO.glob("src/**/*.py"), *REPO.glob("tests/*.py"), REPO / "README.md", *DOCS.glob("*.md"),
             *REPO.glob("docs/reference/*")]
    for path in paths:
        yield path, path.read_text()
    for path in REPO.glob("notebooks/*.ipynb"):
        yield path, "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)


def citations():
    for path, text in texts():
        for match in LINK.finditer(text):
            target, anchor = match.groups()
            if target is None:
                if path.parent != DOCS or match.start() == 0 or text[match.start() - 1] != "(":
                    continue  # only in-page links "(#anchor)" inside docs/
                resolved = path
            elif target.startswith("docs/"):
                resolved = REPO / target
            else:
                resolved = (path.parent / target).resolve()
            if resolved.parent == DOCS or target and "docs/" in target:
                yield path.relative_to(REPO), resolved, anchor


def test_docs_exist_and_have_sections():
    for name in ("algorithms.md", "benchmark.md"):
        assert len(slugs((DOCS / name).read_text())) > 10, name


def test_every_docs_citation_resolves():
    cited = list(citations())
    assert len(cited) > 20  # the sources, tests and notebooks do cite the docs
    missing = [f"{src}: {target.relative_to(REPO)}#{anchor}" for src, target, anchor in cited
               if not target.exists() or anchor not in slugs(target.read_text())]
    assert not missing, "dangling citations:\n" + "\n".join(missing)


def test_no_bare_section_number_citations():
    # sections are cited by anchor (docs/algorithms.md#sinkgd), never by a bare section number
    bare = re.compile(r"(?<![\w/])(?:algorithms|benchmark)\.md`? ?§")
    offenders = [str(path.relative_to(REPO)) for path, text in texts() if bare.search(text)]
    assert not offenders, offenders


def test_slugs_follow_github_rules():
    text = "# Title\n## SWAN-0\n## The papers' figures\n```\n# not a heading\n```\n## Title\n"
    assert slugs(text) == {"title", "swan-0", "the-papers-figures", "title-1"}

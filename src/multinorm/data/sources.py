"""Corpora read with `datasets`: local text/JSON/JSONL/Parquet files, and C4 (streamed from the hub or local shards)."""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Iterator

import torch

from multinorm.data.batches import DEFAULT_VAL_TOKENS, PackedLMData, StreamingLMData, corpus_hash, packed_data
from multinorm.data.hashing import VALIDATION_FRACTION, in_validation
from multinorm.data.tokenizer import model_vocab_size, resolve_tokenizer

C4_TOKENIZER = "t5-base"
C4_VOCAB_SIZE = 32000  # the LLaMA configs of GaLore/SWAN/SinkGD use 32000 with t5-base
C4_SHUFFLE_SEED = 42  # GaLore's torchrun_main.py: data.shuffle(seed=42)
C4_SHUFFLE_BUFFER = 1000  # the `datasets` default that GaLore relies on

# The `datasets` builder for each file extension. `datasets` can infer a builder
# itself, but 5.2.0 sends ".md" to a builder that does not read plain text and
# does not know ".text", so this table decides.
_BUILDERS = {
    ".txt": "text", ".text": "text", ".md": "text",
    ".json": "json", ".jsonl": "json",
    ".parquet": "parquet",
}
_COMPRESSIONS = (".gz", ".bz2", ".xz", ".zst")  # decompressed on the fly by `datasets`


def resolve_data_files(data_files) -> dict[str, list[str]]:
    """``{"train": [...], "validation": [...]?}`` of existing files.

    `data_files` is a path or glob, a list of them, or ``{"train": ...,
    "validation": ...}``. `datasets` resolves each path or glob (relative to the
    current directory, matches sorted); every one must match at least one file.
    """
    from datasets.data_files import resolve_pattern

    if data_files is None:
        raise ValueError(
            "data_files is required here: a path, a list of paths, or "
            '{"train": ..., "validation": ...}'
        )
    splits = data_files if isinstance(data_files, dict) else {"train": data_files}
    if "train" not in splits or set(splits) - {"train", "validation"}:
        raise ValueError(
            f"data_files keys must be 'train' and optionally 'validation', got {sorted(splits)}"
        )
    files = {}
    for split, patterns in splits.items():
        patterns = [patterns] if isinstance(patterns, (str, os.PathLike)) else list(patterns)
        if not patterns:
            raise ValueError(f"no {split} data_files given")
        # resolve_pattern raises FileNotFoundError("Unable to find '<path>'") for a path or glob that matches nothing.
        files[split] = [f for p in patterns for f in resolve_pattern(os.fspath(p), base_path=os.getcwd())]
    return files


def _builder(paths: list[str]) -> str:
    """The `datasets` builder that reads `paths`: text, json or parquet."""
    kinds = set()
    for p in paths:
        name = p.lower()
        for suffix in _COMPRESSIONS:
            name = name.removesuffix(suffix)
        kind = _BUILDERS.get(os.path.splitext(name)[1])
        if kind is None:
            raise ValueError(f"unsupported data file type: {p} (use .txt, .json, .jsonl or .parquet)")
        kinds.add(kind)
    if len(kinds) > 1:
        raise ValueError(f"mixed data file types in one split: {sorted(kinds)}")
    return kinds.pop()


def _read_texts(paths: list[str], hf_cache: Path) -> list[str]:
    from datasets import load_dataset

    ds = load_dataset(_builder(paths), data_files=paths, split="train", cache_dir=str(hf_cache))
    if "text" not in ds.column_names:
        raise ValueError(f"{paths}: no 'text' column (columns: {ds.column_names})")
    # Plain-text files load one line per row; blank lines carry no document.
    return [t for t in ds["text"] if t and t.strip()]


def load_local(data_files, root: Path, **kwargs) -> PackedLMData:
    """Local files as packed token blocks (keyword arguments as for :func:`packed_data`)."""
    files = resolve_data_files(data_files)
    hf_cache = root / "local" / "hf-datasets"
    train_texts = _read_texts(files["train"], hf_cache)
    if "validation" in files:
        val_texts = _read_texts(files["validation"], hf_cache)
        rule = "validation files"
    else:
        flags = [in_validation("text:" + t) for t in train_texts]
        val_texts = [t for t, v in zip(train_texts, flags) if v]
        train_texts = [t for t, v in zip(train_texts, flags) if not v]
        rule = f"hash of each document, {VALIDATION_FRACTION:.0%} to validation"
    work_dir = root / "local" / corpus_hash(train_texts, val_texts)[:16]
    info = {"data_files": files, "split": rule}
    return packed_data("local", work_dir, train_texts, val_texts, info=info, **kwargs)


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


def load_c4(*, seq_len: int, seed: int, data_files, tokenizer, val_tokens: int | None) -> StreamingLMData:
    """C4 as one document per sequence: the hub's ``allenai/c4`` ``en``, or local C4-format JSON shards."""
    from datasets import load_dataset

    if data_files is None:
        train = load_dataset("allenai/c4", "en", split="train", streaming=True)
        val = load_dataset("allenai/c4", "en", split="validation", streaming=True)
        source = "allenai/c4 en (hub)"
    else:
        files = resolve_data_files(data_files)
        streams = load_dataset("json", data_files=files, streaming=True)
        train = streams["train"]
        if "validation" in files:
            val = streams["validation"]
        else:
            val = train.filter(lambda ex: in_validation("text:" + ex["text"]))
            train = train.filter(lambda ex: not in_validation("text:" + ex["text"]))
        source = f"C4-format JSON files: {files}"
    # seed=0 gives the papers' shuffle (42); other seeds give other orders.
    train = train.shuffle(seed=C4_SHUFFLE_SEED + seed, buffer_size=C4_SHUFFLE_BUFFER)

    default_tokenizer = tokenizer is None
    tokenizer = resolve_tokenizer(C4_TOKENIZER if default_tokenizer else tokenizer)
    if tokenizer.pad_token_id is None:
        raise ValueError("the c4 tokenizer needs a pad token")
    vocab_size = C4_VOCAB_SIZE if default_tokenizer else model_vocab_size(tokenizer)
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

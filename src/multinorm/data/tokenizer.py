"""Tokenizers: a byte-level BPE trained on a corpus, or any Hugging Face tokenizer by object, path or name."""

from __future__ import annotations

import hashlib
import os
from typing import Iterable

import numpy as np
from tqdm.auto import tqdm

EOS_TOKEN = "<|endoftext|>"
DEFAULT_VOCAB_SIZE = 4096
# Embedding tables are rounded up to a multiple of this (a friendlier shape
# for matrix kernels; the extra rows are never produced by the tokenizer).
VOCAB_MULTIPLE = 64


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


def resolve_tokenizer(tokenizer):
    """A tokenizer object from an object, a local path, or a hub name (None stays None)."""
    if tokenizer is None or not isinstance(tokenizer, (str, os.PathLike)):
        return tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer))


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 of the tokenizer's full specification (names the token cache of a given tokenizer)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(spec.encode("utf-8")).hexdigest()


def model_vocab_size(tokenizer) -> int:
    """Rows of the model's embedding table for `tokenizer`: its size rounded up to VOCAB_MULTIPLE."""
    return -(-len(tokenizer) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def encode_texts(tokenizer, texts: list[str], desc: str, batch: int = 512) -> list[list[int]]:
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


def join_with_eos(docs: list[list[int]], eos_id: int, dtype) -> np.ndarray:
    """Concatenate documents, each followed by EOS, as one token stream."""
    total = sum(len(d) + 1 for d in docs)
    out = np.empty(total, dtype=dtype)
    pos = 0
    for doc in docs:
        out[pos : pos + len(doc)] = doc
        out[pos + len(doc)] = eos_id
        pos += len(doc) + 1
    return out

"""Training and validation batches: packed token blocks (with their on-disk token cache) or a document stream."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from filelock import FileLock
from tqdm.auto import tqdm

from multinorm.data.hashing import sha256_file, sha256_texts
from multinorm.data.tokenizer import encode_texts, join_with_eos, model_vocab_size, tokenizer_fingerprint, train_tokenizer
from multinorm.io import atomic_write
from multinorm.paths import resolve

log = logging.getLogger(__name__)

DEFAULT_SEQ_LEN = 256
# Validation is capped so evaluation stays cheap on large corpora; the
# wiki-sample validation split is smaller than this, so it is used in full.
DEFAULT_VAL_TOKENS = 262_144


def default_cache_dir() -> Path:
    """``$MULTINORM_DATA`` if set, else ``data/`` in the repository (`multinorm.paths.resolve`), wherever the
    process runs: a notebook opened in `notebooks/` reads the same cache as `make figures`."""
    return Path(os.environ["MULTINORM_DATA"]) if "MULTINORM_DATA" in os.environ else resolve("data")


def cache_root(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir is not None else default_cache_dir()


# --------------------------------------------------------------------------
# the data objects
# --------------------------------------------------------------------------


@dataclass(kw_only=True)
class LMData:
    """Batches of token ids for causal language modelling.

    ``train_batch(step, batch_size)`` returns ``(input_ids, labels)``, both
    ``LongTensor[batch_size, seq_len]``; labels equal input_ids except at
    padding (-100). ``rows=slice(a, b)`` returns only rows ``a:b`` of that
    batch (one rank's share under data parallelism; a stream still advances by
    the whole batch, and only the share is tokenized). Labels are *not* shifted: Hugging Face causal LMs shift
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

    def train_batch(self, step: int, batch_size: int,
                    rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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

    def train_batch(self, step: int, batch_size: int,
                    rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = self.train_blocks[self.block_indices(step, batch_size)[rows or slice(None)]]
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

    def train_batch(self, step: int, batch_size: int,
                    rows: slice | None = None) -> tuple[torch.Tensor, torch.Tensor]:
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
        return self.encode(texts[rows or slice(None)])

    def val_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        _check_step(0, batch_size)
        for i in range(0, self.val_input_ids.shape[0], batch_size):
            yield self.val_input_ids[i : i + batch_size], self.val_labels[i : i + batch_size]


# --------------------------------------------------------------------------
# packed corpora (wiki-sample, local): token cache and blocks
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
    if tokenizer is None:
        cache = work_dir / f"bpe-v{vocab_size}-{corpus_hash[:12]}"
    else:
        cache = work_dir / f"tok-{tokenizer_fingerprint(tokenizer)[:12]}-{corpus_hash[:12]}"
    # Parallel sweep workers (and test workers) may ask for the same cache at once: one builds, the rest wait.
    work_dir.mkdir(parents=True, exist_ok=True)
    with FileLock(cache.parent / f".{cache.name}.lock"):
        return _load_or_build_tokens(cache, corpus_hash, train_texts, val_texts, vocab_size, tokenizer)


def _load_or_build_tokens(cache: Path, corpus_hash: str, train_texts: list[str], val_texts: list[str],
                          vocab_size: int, tokenizer) -> tuple[Any, np.ndarray, np.ndarray, dict]:
    from transformers import PreTrainedTokenizerFast

    own = tokenizer is None
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
    train_ids = join_with_eos(encode_texts(tokenizer, train_texts, "tokenizing train"), eos_id, dtype)
    val_ids = join_with_eos(encode_texts(tokenizer, val_texts, "tokenizing validation"), eos_id, dtype)
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


def corpus_hash(train_texts: list[str], val_texts: list[str]) -> str:
    """Identity of a split corpus: it names the token cache, so any change of text or split rebuilds it."""
    return sha256_texts(["train"] + train_texts + ["validation"] + val_texts)


def packed_data(
    name: str, work_dir: Path, train_texts: list[str], val_texts: list[str], *,
    seq_len: int, vocab_size: int, seed: int, tokenizer, val_tokens: int | None,
    info: dict,
) -> PackedLMData:
    """Tokenize a split corpus (cached under `work_dir`) and cut it into ``seq_len`` blocks."""
    for split, texts in (("train", train_texts), ("validation", val_texts)):
        if not any(t.strip() for t in texts):
            raise ValueError(
                f"{name}: the {split} split is empty ({len(texts)} documents, "
                f"{sum(len(t) for t in texts)} characters); it needs text to tokenize"
            )
    digest = corpus_hash(train_texts, val_texts)
    tokenizer, train_ids, val_ids, meta = _prepare_tokens(
        work_dir, digest, train_texts, val_texts, vocab_size, tokenizer
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
        "corpus_sha256": digest,
        **{k: v for k, v in meta.items() if k.endswith("_s")},
    }
    return PackedLMData(
        name=name,
        tokenizer=tokenizer,
        seq_len=seq_len,
        vocab_size=model_vocab_size(tokenizer),
        n_train_tokens=n_train_blocks * seq_len,
        n_val_tokens=n_val_blocks * seq_len,
        seed=seed,
        train_blocks=train_ids[: n_train_blocks * seq_len].reshape(n_train_blocks, seq_len),
        val_blocks=val_ids[: n_val_blocks * seq_len].reshape(n_val_blocks, seq_len),
        info=info,
    )

"""Content hashes shared by every corpus: file integrity, corpus identity, and the held-out rule.

SHA-256 is used throughout because its digests do not depend on the Python
process (unlike ``hash()``, which changes with ``PYTHONHASHSEED``), so caches
and splits are the same on every machine.
"""

from __future__ import annotations

import hashlib
import os
from typing import Iterable

# Share of documents (or article titles) held out for validation when a corpus
# has no validation files of its own.
VALIDATION_FRACTION = 0.05


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_texts(texts: Iterable[str]) -> str:
    """One digest for a sequence of documents (names the token cache of a corpus)."""
    digest = hashlib.sha256()
    for text in texts:
        data = text.encode("utf-8")
        # Length-prefix each document so ["ab", "c"] and ["a", "bc"] differ.
        digest.update(len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def in_validation(key: str, fraction: float = VALIDATION_FRACTION) -> bool:
    """Deterministic ~`fraction` split on a string key."""
    h = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(h[:8], "big") < fraction * 2**64

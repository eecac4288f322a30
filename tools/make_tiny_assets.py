"""Write the tiny CPU assets the recipes use: tokenizer, a random student init and count-domain data.

    python tools/make_tiny_assets.py [--out assets/tiny]
"""

import argparse
from pathlib import Path

from megatron_opd.data.tokenizer import build_char_tokenizer
from megatron_opd.data.toy import chat_rows, write_jsonl
from megatron_opd.model.tiny import make_tiny_qwen3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("assets/tiny"))
    args = parser.parse_args()
    tokenizer = build_char_tokenizer(args.out / "tokenizer")
    make_tiny_qwen3(args.out / "student_init", len(tokenizer), "nano", seed=0, tokenizer_dir=args.out / "tokenizer")
    test = chat_rows("count", 100, seed=2)
    train = chat_rows("count", 800, seed=1, exclude={r["messages"][0]["content"] for r in test})
    write_jsonl(train, args.out / "data" / "count" / "train.jsonl")
    write_jsonl(test, args.out / "data" / "count" / "test.jsonl")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

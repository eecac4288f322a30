"""Teacher scoring payloads and prefix sharing, measured against a real embedded teacher server.

For 512 completion tokens (n=8 samples x 64 tokens of one 48-token prompt) with top-k 20:
bytes per scored token in SGLang's JSON vs the binary payload, and teacher tokens prefilled per
scored token (SGLang's accounting: prompt_tokens - cached_tokens) next to the ideal
1 + prompt_len / (n * completion_len).

    python tools/bench_teachers.py [--vocab 100 151936]
"""

import argparse
import tempfile
import time
from pathlib import Path

import torch

from megatron_opd.data.tokenizer import build_char_tokenizer
from megatron_opd.model.tiny import make_tiny_qwen3
from megatron_opd.wire.process import start_server
from megatron_opd.teachers.backends import SGLangScorer


def measure(model: Path, vocab: int, n: int, prompt_len: int, completion_len: int, top_k: int) -> dict:
    server = start_server(model, role="teacher")
    try:
        torch.manual_seed(0)
        prompt = torch.randint(4, vocab, (prompt_len,)).tolist()
        seqs = [prompt + torch.randint(4, vocab, (completion_len,)).tolist() for _ in range(n)]
        starts = [prompt_len] * n
        row = {}
        for label, scorer in [("SGLang JSON", SGLangScorer(server.url, binary=False)),
                              ("binary (top-k float16)", SGLangScorer(server.url)),
                              ("binary (top-k float32)", SGLangScorer(server.url, top_dtype="float32"))]:
            began = time.perf_counter()
            scores = scorer.score(seqs, starts, top_k=top_k)
            row[label] = (scorer.last_response_bytes / (n * completion_len), time.perf_counter() - began)
        computed = sum(s.computed_tokens for s in scores)
        row["computed_per_scored"] = computed / (n * completion_len)
        return row
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vocab", type=int, nargs="+", default=[100, 151936], help="vocabulary sizes to try")
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=48)
    parser.add_argument("--completion-len", type=int, default=64)
    parser.add_argument("--top-k", type=int, default=20)
    args = parser.parse_args()
    tokens = args.n * args.completion_len
    print(f"{tokens} completion tokens ({args.n} samples x {args.completion_len}) of one {args.prompt_len}-token prompt, top-k {args.top_k}")
    with tempfile.TemporaryDirectory() as tmp:
        tok = build_char_tokenizer(Path(tmp) / "tok")
        for vocab in args.vocab:
            if vocab < len(tok):
                raise SystemExit(f"--vocab {vocab}: must be >= the tokenizer's {len(tok)} tokens")
            model = make_tiny_qwen3(Path(tmp) / f"v{vocab}", vocab, "nano", tokenizer_dir=Path(tmp) / "tok")
            row = measure(model, vocab, args.n, args.prompt_len, args.completion_len, args.top_k)
            json_bytes = row["SGLang JSON"][0]
            print(f"\nvocabulary {vocab}:")
            print(f"  {'payload':<26} {'bytes/token':>12} {'vs JSON':>8} {'request s':>10}")
            for label in ("SGLang JSON", "binary (top-k float16)", "binary (top-k float32)"):
                per_token, seconds = row[label]
                print(f"  {label:<26} {per_token:12.1f} {per_token / json_bytes:8.3f} {seconds:10.2f}")
            ideal = 1 + args.prompt_len / tokens
            print(f"  teacher tokens computed per scored token: {row['computed_per_scored']:.3f} "
                  f"(ideal {ideal:.3f}; without prefix sharing {(args.prompt_len + args.completion_len) / args.completion_len:.3f})")


if __name__ == "__main__":
    main()

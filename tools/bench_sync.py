"""Weight-sync bandwidth: disk and distributed (gloo) modes into an embedded rollout server, next
to the plain loopback TCP bandwidth measured in the same run.

    python tools/bench_sync.py [--size bench] [--repeats 7] [--flattened]
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from safetensors.torch import load_file

from megatron_opd.bench.limits import loopback_gbps
from megatron_opd.data.tokenizer import build_char_tokenizer
from megatron_opd.model.tiny import make_tiny_qwen3
from megatron_opd.platform.net import free_port
from megatron_opd.wire.client import SGLangClient
from megatron_opd.rollout.weight_push import DistributedPusher, push_to_servers_via_disk


def loopback_mb_per_s(nbytes: int) -> float:
    """One TCP stream over 127.0.0.1 (megatron_opd.bench.limits.loopback_gbps), in MB/s."""
    return loopback_gbps(nbytes) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="bench")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--flattened", action="store_true", help="also time SGLang's flattened_bucket format")
    parser.add_argument("--bucket-mb", type=int, default=256, help="weight-sync bucket size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        tok = build_char_tokenizer(tmp / "tok")
        model = make_tiny_qwen3(tmp / "model", len(tok), args.size, tokenizer_dir=tmp / "tok")
        weights = load_file(str(model / "model.safetensors"))
        nbytes = sum(t.numel() * t.element_size() for t in weights.values())
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "megatron_opd.cli", "serve", "--model", str(model),
                                 "--port", str(port)], stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        try:
            for _ in range(240):
                try:
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            client = SGLangClient(url)
            per_tensor = DistributedPusher([client], master_port=free_port())
            rows: dict[str, list[float]] = {}
            bucket = args.bucket_mb << 20
            # Interleaved, so every mode sees the same machine load (2 shared cores are noisy).
            for i in range(args.repeats):
                rows.setdefault("loopback TCP (reference)", []).append(loopback_mb_per_s(nbytes))
                rows.setdefault("disk (safetensors + /update_weights_from_disk)", []).append(
                    push_to_servers_via_disk([client], iter(weights.items()), f"d{i}", tmp / "sync", bucket).mb_per_s)
                rows.setdefault("distributed (gloo, one broadcast per tensor)", []).append(
                    per_tensor.push(iter(weights.items()), f"g{i}", bucket).mb_per_s)
                if args.flattened:
                    rows.setdefault("distributed (gloo, flattened_bucket)", []).append(
                        per_tensor.push(iter(weights.items()), f"f{i}", bucket, flattened=True).mb_per_s)
            per_tensor.close()
        finally:
            proc.terminate()
        print(f"weights: {len(weights)} tensors, {nbytes / 1e6:.1f} MB (size '{args.size}'), {args.repeats} rounds")
        print(f"  {'mode':<50} {'median':>8} {'best':>8}  MB/s")
        for name, values in rows.items():
            print(f"  {name:<50} {statistics.median(values):8.1f} {max(values):8.1f}")
        loop = statistics.median(rows["loopback TCP (reference)"])
        for name, values in rows.items():
            if name.startswith("distributed"):
                print(f"  {name} / loopback (medians) = {statistics.median(values) / loop:.0%}")


if __name__ == "__main__":
    main()

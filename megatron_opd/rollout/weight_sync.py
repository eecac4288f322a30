"""Push a stream of HF-named tensors to rollout engines.

The stream comes from the trainer (mbridge export gathered over TP/PP); this module only consumes
it, so rollout code never imports Megatron. Modes:

* ``disk``: write bounded-size safetensors buckets to a fresh directory, then
  ``/update_weights_from_disk`` on every server;
* ``in_process``: copy straight into an in-process engine.

Sequence for servers: pause -> update -> new weight version -> continue.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch


@dataclass
class SyncReport:
    mode: str
    tensors: int
    bytes: int
    seconds: float
    version: str

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


def buckets(stream: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Group the stream into dicts of at most ``bucket_bytes`` (a larger single tensor is its own bucket)."""
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in stream:
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = tensor.detach().to("cpu").contiguous()
        size += nbytes
    if bucket:
        yield bucket


def write_safetensors_dir(stream: Iterable[tuple[str, torch.Tensor]], out_dir: Path, bucket_bytes: int) -> tuple[int, int]:
    """Write the stream as ``model-0000i.safetensors`` buckets + index; returns (tensors, bytes)."""
    from safetensors.torch import save_file

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weight_map, total, count = {}, 0, 0
    for i, bucket in enumerate(buckets(stream, bucket_bytes)):
        fname = f"model-{i:05d}.safetensors"
        save_file(bucket, str(tmp / fname), metadata={"format": "pt"})
        for name, tensor in bucket.items():
            weight_map[name] = fname
            total += tensor.numel() * tensor.element_size()
            count += 1
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return count, total


def push_to_servers_via_disk(clients: list[Any], stream: Iterable[tuple[str, torch.Tensor]], version: str,
                             work_dir: Path, bucket_bytes: int = 64 << 20) -> SyncReport:
    start = time.perf_counter()
    out_dir = Path(work_dir) / f"weights-v{version}"
    count, total = write_safetensors_dir(stream, out_dir, bucket_bytes)
    for client in clients:
        client.pause()
    try:
        for client in clients:
            client.update_weights_from_disk(str(out_dir.resolve()), version)
    finally:
        for client in clients:
            client.resume()
    shutil.rmtree(out_dir, ignore_errors=True)
    return SyncReport("disk", count, total, time.perf_counter() - start, version)


def push_in_process(engine: Any, stream: Iterable[tuple[str, torch.Tensor]], version: str) -> SyncReport:
    start = time.perf_counter()
    sizes: list[int] = []

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in stream:
            sizes.append(tensor.numel() * tensor.element_size())
            yield name, tensor

    engine.pause()
    try:
        engine.update_weights(counted(), version)
    finally:
        engine.resume()
    return SyncReport("in_process", len(sizes), sum(sizes), time.perf_counter() - start, version)

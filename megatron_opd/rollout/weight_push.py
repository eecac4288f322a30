"""Push a stream of HF-named tensors to rollout engines.

The stream comes from the trainer (mbridge export gathered over TP/PP); this module only consumes
it, so rollout code never imports Megatron. Modes:

* ``disk``: write bounded-size safetensors buckets to a fresh directory, then
  ``/update_weights_from_disk`` on every server;
* ``distributed``: ``/init_weights_update_group`` once, then per bucket
  ``/update_weights_from_distributed`` while trainer rank 0 broadcasts over a standalone group that
  includes the servers (gloo on CPU, NCCL on GPU): by default one broadcast per tensor, or with
  ``flattened=True`` the bucket's bytes as one buffer (SGLang's ``load_format="flattened_bucket"``);
* ``in_process``: copy straight into an in-process engine.

Sequence for servers: pause -> update -> new weight version -> continue.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import torch

from megatron_opd.platform.faults import skips_reload


@dataclass
class SyncReport:
    mode: str
    tensors: int
    bytes: int
    seconds: float
    version: str
    failed: dict[int, str] = field(default_factory=dict)  # server index -> why it missed this sync (tolerated)

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
                             work_dir: Path, bucket_bytes: int = 64 << 20, tolerate_unreachable: bool = False,
                             indices: list[int] | None = None) -> SyncReport:
    """Write the weights once, then pause -> reload -> new version -> resume every server. With
    ``tolerate_unreachable``, a server that cannot be reached (dead, or failing server-side) is left out and named
    in the report's ``failed`` (by its index in ``indices``, default its position), as long as one server took the
    weights; any other error stops the sync."""
    from megatron_opd.wire.client import ServerError

    start = time.perf_counter()
    indices = list(range(len(clients))) if indices is None else indices
    out_dir = Path(work_dir) / f"weights-v{version}"
    count, total = write_safetensors_dir(stream, out_dir, bucket_bytes)
    failed: dict[int, str] = {}

    def each(step) -> None:
        for index, client in zip(indices, clients):
            if index in failed:
                continue
            try:
                step(index, client)
            except ServerError as exc:
                if not (tolerate_unreachable and exc.retryable):
                    raise
                failed[index] = str(exc)

    def reload(index: int, client: Any) -> None:
        if skips_reload(version, index):  # fault injection: the version moves, the weights do not
            client.update_weight_version(version)
        else:
            client.update_weights_from_disk(str(out_dir.resolve()), version)

    try:
        each(lambda index, client: client.pause())
        each(reload)
    finally:
        each(lambda index, client: client.resume())
        shutil.rmtree(out_dir, ignore_errors=True)
    if clients and len(failed) == len(clients):
        raise ServerError(f"weight sync {version}: no server took the weights ({'; '.join(failed.values())})")
    return SyncReport("disk", count, total, time.perf_counter() - start, version, failed)


def _in_thread(fn, *args) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fn(*args)
        except BaseException as exc:  # surfaced to the caller after join
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, errors


def _join(calls: list[tuple[threading.Thread, list[BaseException]]]) -> None:
    for thread, errors in calls:
        thread.join()
        if errors:
            raise errors[0]


class DistributedPusher:
    """Trainer rank 0's end of distributed weight sync to a set of servers (one group, reused)."""

    def __init__(self, clients: list[Any], master_port: int, master_address: str = "127.0.0.1",
                 backend: str = "gloo", flattened: bool = False) -> None:
        from megatron_opd.rollout.update_group import WeightUpdateGroup

        self.clients = clients
        world = 1 + len(clients)
        calls = [_in_thread(c.init_weights_update_group, master_address, master_port, 1 + i, world, backend)
                 for i, c in enumerate(clients)]
        self.group = WeightUpdateGroup(master_address, master_port, 0, world, backend)
        self.flattened = flattened
        _join(calls)

    def push(self, stream: Iterable[tuple[str, torch.Tensor]], version: str, bucket_bytes: int = 64 << 20,
             flattened: bool | None = None) -> SyncReport:
        """Broadcast the stream bucket by bucket; ``flattened`` overrides the pusher's default format."""
        from megatron_opd.rollout.update_group import FLATTENED_BUCKET, dtype_name, flatten_bucket

        start, count, total = time.perf_counter(), 0, 0
        try:
            for client in self.clients:
                client.pause()
            for bucket in buckets(stream, bucket_bytes):
                names, tensors = list(bucket), list(bucket.values())
                dtypes = [dtype_name(t.dtype) for t in tensors]
                shapes = [list(t.shape) for t in tensors]
                flat = self.flattened if flattened is None else flattened
                load_format = FLATTENED_BUCKET if flat else None
                calls = [_in_thread(c.update_weights_from_distributed, names, dtypes, shapes, version,
                                    "weight_update_group", load_format) for c in self.clients]
                for tensor in [flatten_bucket(tensors)] if flat else tensors:
                    self.group.broadcast(tensor, root=0)
                count += len(tensors)
                total += sum(t.numel() * t.element_size() for t in tensors)
                _join(calls)
        finally:
            for client in self.clients:
                client.resume()
        return SyncReport("distributed", count, total, time.perf_counter() - start, version)

    def close(self) -> None:
        try:
            for client in self.clients:
                client.destroy_weights_update_group()
        finally:
            self.group.close()


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

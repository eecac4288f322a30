"""This machine's own limits, measured: fp32 GEMM peak, memory copy bandwidth, loopback TCP and the
file system's write + read-back bandwidth. Benchmarks hold their figures against these, measured in
the same run and for the same cores (e.g. the GEMM peak of two single-threaded processes running at
once, for a TP2 trainer whose two ranks have one thread each).

Each measurement runs in its own fresh process (``python -m megatron_opd.bench.limits KIND ...``), so
no other work shares its cores, and prints one JSON line.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path


def gemm_gflops(threads: int, n: int = 2048, seconds: float = 3.0) -> float:
    """fp32 matmul [n, n] x [n, n] GFLOPS on ``threads`` torch threads (after a warm-up)."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    began, done = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        a @ b
        done += 1
    return 2 * n ** 3 * done / (time.perf_counter() - began) / 1e9


def copy_gbps(threads: int, nbytes: int = 1 << 30, repeats: int = 5) -> dict[str, float]:
    """Memory bandwidth on ``threads`` threads over buffers far larger than any cache: ``copy`` counts
    the bytes read and written per second of a tensor copy (STREAM's convention), ``read`` the bytes
    of a sum."""
    import torch

    torch.set_num_threads(threads)
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    src.sum()
    began = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    copy = 2 * nbytes * repeats / (time.perf_counter() - began) / 1e9
    began = time.perf_counter()
    for _ in range(repeats):
        src.sum()
    return {"copy": copy, "read": nbytes * repeats / (time.perf_counter() - began) / 1e9}


def loopback_gbps(nbytes: int = 1 << 30) -> float:
    """One TCP stream over 127.0.0.1, 4 MiB writes, the receiver draining into a buffer."""
    chunk = bytes(4 << 20)
    nbytes = -(-nbytes // len(chunk)) * len(chunk)
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)

    def drain() -> None:
        conn, _ = server.accept()
        buf, received = bytearray(4 << 20), 0
        while received < nbytes:
            n = conn.recv_into(buf)
            if not n:
                break
            received += n
        conn.close()

    thread = threading.Thread(target=drain)
    thread.start()
    client = socket.create_connection(server.getsockname())
    began = time.perf_counter()
    for _ in range(nbytes // len(chunk)):
        client.sendall(chunk)
    thread.join()
    elapsed = time.perf_counter() - began
    client.close()
    server.close()
    return nbytes / elapsed / 1e9


def disk_gbps(directory: Path, nbytes: int = 1 << 30) -> float:
    """Write a file of ``nbytes`` in ``directory`` and read it back (what a disk weight sync does with
    its safetensors files: through the page cache, no fsync): bytes moved per second, each way once."""
    block = os.urandom(16 << 20)
    with tempfile.NamedTemporaryFile(dir=directory) as f:
        began = time.perf_counter()
        for _ in range(nbytes // len(block)):
            f.write(block)
        f.flush()
        f.seek(0)
        while f.read(16 << 20):
            pass
        elapsed = time.perf_counter() - began
    return nbytes / elapsed / 1e9


def baseline_bytes(role: str, tokenizer_dir: str) -> int:
    """Resident bytes of a fresh process of ``role`` ('trainer' or 'server') once its libraries are
    imported and the run's tokenizer loaded, before any model: what the interpreter itself costs."""
    if role == "trainer":
        import megatron_opd.train.opd  # noqa: F401
        from megatron_opd.model.bridge import load_backends

        load_backends()
    else:
        import megatron_opd.serve.rollout_server  # noqa: F401
        import megatron_opd.rollout.embedded  # noqa: F401
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer_dir)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _child(args: list[str]) -> dict:
    proc = subprocess.run([sys.executable, "-m", "megatron_opd.bench.limits", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"limit measurement {args} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def concurrent_gemm_gflops(processes: int, threads: int, seconds: float = 3.0) -> float:
    """The summed GEMM rate of ``processes`` processes of ``threads`` threads running at the same time."""
    procs = [subprocess.Popen([sys.executable, "-m", "megatron_opd.bench.limits", "gemm", str(threads), str(seconds)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
             for _ in range(processes)]
    rates = [json.loads(p.communicate()[0].strip().splitlines()[-1])["gflops"] for p in procs]
    if any(p.returncode for p in procs):
        raise RuntimeError("a GEMM measurement process failed")
    return sum(rates)


@dataclass
class Limits:
    gemm_1thread_gflops: float
    gemm_trainer_gflops: float  # the trainer's processes x threads, concurrently
    trainer_layout: str
    copy_1thread_gbps: float
    read_1thread_gbps: float
    loopback_gbps: float
    disk_gbps: float
    trainer_baseline: float  # bytes
    server_baseline: float
    gemm_note: str = ""  # how the GEMM peaks were taken (a shared host's speed drifts: measured twice)

    def lines(self) -> list[str]:
        return [f"machine: fp32 GEMM peak {self.gemm_1thread_gflops:.0f} GFLOPS on one thread, "
                f"{self.gemm_trainer_gflops:.0f} GFLOPS for the trainer ({self.trainer_layout}, at once)"
                + (f" ({self.gemm_note})" if self.gemm_note else ""),
                f"machine: memory copy {self.copy_1thread_gbps:.1f} GB/s (read + written) and read "
                f"{self.read_1thread_gbps:.1f} GB/s on one thread; loopback TCP {self.loopback_gbps:.1f} GB/s; "
                f"file write + read back {self.disk_gbps:.1f} GB/s; an idle trainer process "
                f"{self.trainer_baseline / 2**30:.2f} GiB, server {self.server_baseline / 2**30:.2f} GiB resident"]


def measure_limits(trainer_processes: int, trainer_threads: int, work: Path, tokenizer_dir: Path) -> Limits:
    """Every limit, each in fresh processes, one after another (run before anything else starts)."""
    mem = _child(["copy", "1"])
    return Limits(_child(["gemm", "1", "3"])["gflops"], concurrent_gemm_gflops(trainer_processes, trainer_threads),
                  f"{trainer_processes} processes x {trainer_threads} thread{'s' if trainer_threads > 1 else ''}",
                  mem["copy"], mem["read"], _child(["loopback"])["gbps"], _child(["disk", str(work)])["gbps"],
                  _child(["baseline", "trainer", str(tokenizer_dir)])["bytes"],
                  _child(["baseline", "server", str(tokenizer_dir)])["bytes"])


def remeasure_gemm(limits: Limits, trainer_processes: int, trainer_threads: int) -> Limits:
    """The GEMM peaks measured again (e.g. right after the runs they judge), averaged with the first
    reading; both readings named in the figure."""
    one, trainer = _child(["gemm", "1", "3"])["gflops"], concurrent_gemm_gflops(trainer_processes, trainer_threads)
    note = (f"mean of {limits.gemm_1thread_gflops:.0f} / {limits.gemm_trainer_gflops:.0f} before and {one:.0f} / "
            f"{trainer:.0f} after the TP2 loop")
    return replace(limits, gemm_1thread_gflops=(limits.gemm_1thread_gflops + one) / 2,
                   gemm_trainer_gflops=(limits.gemm_trainer_gflops + trainer) / 2, gemm_note=note)


def main(argv: list[str]) -> None:
    kind = argv[0]
    if kind == "gemm":
        out = {"gflops": gemm_gflops(int(argv[1]), seconds=float(argv[2]))}
    elif kind == "copy":
        out = copy_gbps(int(argv[1]))
    elif kind == "loopback":
        out = {"gbps": loopback_gbps()}
    elif kind == "disk":
        out = {"gbps": disk_gbps(Path(argv[1]))}
    elif kind == "baseline":
        out = {"bytes": baseline_bytes(argv[1], argv[2])}
    else:
        raise SystemExit(f"unknown measurement {kind!r}")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])

"""What a training rank's memory does, read from the operating system (``run.memory_probe``).

On CPU there is no allocator to ask: the resident set (``VmRSS``) and its high-water mark (``VmHWM``,
resettable through ``/proc/self/clear_refs``) are what the machine actually had to provide. The probe
wraps the loss head: it resets the high-water mark when the loss starts and when its backward starts
(a hook on the loss), and reads it when the loss's forward has ended and when the logits' gradient
exists (a hook on the logits shard): the extra memory of the loss forward and of its backward, the
logits' gradient included. It keeps the process's true peak across its own resets. Before each reset
it returns the allocator's free memory to the system (glibc's ``malloc_trim``), so what the loss
allocates shows in the resident set even where it reuses memory freed earlier. Linux only.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.distributed as dist

MIB = 1 << 20


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


class MemoryProbe:
    def __init__(self) -> None:
        self.peak = _status("VmHWM")
        self.forward: list[int] = []
        self.backward: list[int] = []
        self._base = 0
        try:
            import ctypes

            self._libc = ctypes.CDLL("libc.so.6")
        except OSError:  # not glibc: readings may miss reused memory
            self._libc = None

    def _reset(self) -> None:
        self.peak = max(self.peak, _status("VmHWM"))
        if self._libc is not None:
            self._libc.malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        self._base = _status("VmRSS")

    def _extra(self) -> int:
        return max(0, _status("VmHWM") - self._base)

    def wrap(self, loss_fn: Callable[..., Any]) -> Callable[..., Any]:
        """``loss_fn(logits_shard, batch)`` measured: forward and backward extra memory per micro-batch."""

        def measured(logits_shard: torch.Tensor, batch: dict[str, torch.Tensor]) -> Any:
            self._reset()
            loss_sum, tokens, metrics = loss_fn(logits_shard, batch)
            self.forward.append(self._extra())
            if loss_sum.requires_grad:
                handles = []

                def started(grad: torch.Tensor) -> torch.Tensor:
                    self._reset()
                    return grad

                def finished(grad: torch.Tensor) -> torch.Tensor:
                    self.backward.append(self._extra())
                    for handle in handles:
                        handle.remove()
                    return grad

                handles += [loss_sum.register_hook(started), logits_shard.register_hook(finished)]
            return loss_sum, tokens, metrics

        return measured

    def step_metrics(self) -> dict[str, float]:
        """This step's largest loss extras and every rank's peak resident set so far (a collective); on a
        GPU also each rank's peak of allocated GPU memory (``torch.cuda.max_memory_allocated``)."""
        from megatron_opd.platform.dist import comm_device

        gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else 0
        mine = torch.tensor([max(self.peak, _status("VmHWM")), max(self.forward, default=0), max(self.backward, default=0),
                             gpu], dtype=torch.float64, device=comm_device())
        self.forward, self.backward = [], []
        ranks = [mine]
        if dist.is_initialized():
            ranks = [torch.zeros_like(mine) for _ in range(dist.get_world_size())]
            dist.all_gather(ranks, mine)
        ranks = [v.cpu() for v in ranks]
        out = {f"memory/rank{r}_peak_rss_mib": float(v[0]) / MIB for r, v in enumerate(ranks)}
        if gpu:
            out.update({f"memory/rank{r}_peak_gpu_mib": float(v[3]) / MIB for r, v in enumerate(ranks)})
        out["memory/loss_forward_extra_mib"] = max(float(v[1]) for v in ranks) / MIB
        out["memory/loss_backward_extra_mib"] = max(float(v[2]) for v in ranks) / MIB
        return out

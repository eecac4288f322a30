"""torchrun worker: rank 1 signals itself in step 3; every rank asks stop_agreed() after each step."""
import os
import signal

import torch.distributed as dist

from megatron_opd.platform.signals import install_stop_signals, stop_agreed

dist.init_process_group("gloo")
install_stop_signals(["SIGUSR1"])
for step in range(1, 11):
    if dist.get_rank() == 1 and step == 3:
        os.kill(os.getpid(), signal.SIGUSR1)
    if stop_agreed():
        os.write(1, f"rank {dist.get_rank()} stopped after step {step}\n".encode())  # one write: lines never interleave
        break
dist.destroy_process_group()

"""The stop signals (platform/signals.py): each is noted once, the same one again within the window is the
same event, a later one exits at once; and every rank agrees to stop after the same step."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from helpers import REPO, WORKERS, torchrun
from megatron_opd.platform.signals import DUPLICATE_WINDOW_S

CHILD = """
import sys, time
from megatron_opd.platform.signals import install_stop_signals
stops = install_stop_signals(["SIGTERM", "SIGINT", "SIGUSR1"])
print("ready", flush=True)
while stops.received is None:
    time.sleep(0.01)
print("noted", stops.received.name, flush=True)
time.sleep(float(sys.argv[1]))
print("survived", flush=True)
"""


def _child(linger_s: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(linger_s)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "ready"
    return proc


@pytest.mark.parametrize("name", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_stop_signal_is_noted_and_the_same_one_again_at_once_is_the_same_event(name):
    proc = _child(linger_s=DUPLICATE_WINDOW_S + 1.0)
    proc.send_signal(getattr(signal, name))
    assert proc.stdout.readline().split() == ["noted", name]
    proc.send_signal(getattr(signal, name))  # a second route of the same event (the launcher's copy)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0 and out.strip() == "survived", (proc.returncode, out, err)
    assert "finishing this step, then writing a checkpoint and exiting with 75" in err


def test_a_second_signal_after_the_window_exits_at_once():
    proc = _child(linger_s=60.0)
    proc.send_signal(signal.SIGTERM)
    assert proc.stdout.readline().split() == ["noted", "SIGTERM"]
    time.sleep(DUPLICATE_WINDOW_S + 0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 5
    assert proc.returncode == 128 + signal.SIGINT and "survived" not in out
    assert "SIGINT received again: exiting at once without a checkpoint" in err


@pytest.mark.slow
def test_a_signal_to_one_rank_stops_every_rank_after_the_same_step():
    """Rank 1 alone receives SIGUSR1 during its step 3: both ranks agree (one all-reduce per step) to stop after it."""
    job = torchrun(2, [str(WORKERS / "signals_worker.py")], timeout=300)
    lines = sorted(re.findall(r"rank \d stopped after step \d+", job.stdout))
    assert lines == ["rank 0 stopped after step 3", "rank 1 stopped after step 3"], job.stdout + job.stderr

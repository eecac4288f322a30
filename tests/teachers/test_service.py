"""The teacher set a run starts: launch, routing and weights end to end; a killed run leaves no server behind."""
import os
import signal
from pathlib import Path

import pytest
import torch
from helpers import REPO

from megatron_opd.algo.advantages import mix_teacher_logprobs
from megatron_opd.config.teachers import RoutingSpec
from megatron_opd.teachers.router import topk_entropy
from megatron_opd.teachers.service import TeacherSet

TEACHER = REPO / "assets" / "tiny" / "teachers" / "arithmetic"


STUDENT = REPO / "assets" / "tiny" / "student_init"


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its new parent to reap it counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


def test_teacher_set_launches_routes_and_weights(rollouts, tmp_path):
    spec = RoutingSpec.model_validate({
        "teachers": {"arithmetic": {"model": str(TEACHER)}, "original": {"model": str(REPO / "assets" / "tiny" / "original")}},
        "routes": {"arithmetic": [{"teacher": "arithmetic", "weight": 1}, {"teacher": "original", "weight": 1}]},
        "weighting": "confidence",
    })
    with TeacherSet.start(spec, student_dir=STUDENT, log_dir=tmp_path) as teachers:
        procs = [s.proc for s in teachers.servers]
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
        out = teachers.score(rollouts[:4], top_k=4)
        counters = teachers.counters()
    assert all(p.poll() is not None for p in procs)  # the servers it launched are gone
    for sample, scored in zip(rollouts[:4], out):
        assert set(scored.scores) == {"arithmetic", "original"}
        total = scored.weights["arithmetic"] + scored.weights["original"]
        assert torch.allclose(total, torch.ones(len(sample.token_ids) - sample.start))
        # confidence weights: softmax over teachers of log(0.5) - entropy (tau 1), per token
        entropies = torch.stack([topk_entropy(scored.scores[u]) for u in ("arithmetic", "original")])
        expected = torch.softmax(torch.log(torch.tensor(0.5)) - entropies, 0)
        assert torch.allclose(scored.weights["arithmetic"], expected[0], atol=1e-6)
        assert not torch.allclose(scored.weights["arithmetic"], torch.full_like(expected[0], 0.5))
        units = list(scored.scores)
        mixed = mix_teacher_logprobs([scored.scores[u].logprobs for u in units], [scored.weights[u] for u in units])
        lo = torch.minimum(scored.scores["arithmetic"].logprobs, scored.scores["original"].logprobs)
        hi = torch.maximum(scored.scores["arithmetic"].logprobs, scored.scores["original"].logprobs)
        assert ((mixed >= lo - 1e-6) & (mixed <= hi + 1e-6)).all()
    assert counters["arithmetic"]["samples"] == 4 and counters["arithmetic"]["tokens"] > 0


def test_a_killed_run_leaves_no_server_behind(tmp_path):
    """SIGKILL the process that started a teacher server: the server goes too (PR_SET_PDEATHSIG)."""
    import subprocess
    import sys
    import time

    code = ("import os, sys, time\nfrom pathlib import Path\nfrom megatron_opd.wire.process import start_server\n"
            f"s = start_server(Path({str(TEACHER)!r}), role='teacher')\n"
            "print(s.proc.pid, flush=True)\ntime.sleep(600)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=REPO,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    child = int(parent.stdout.readline())
    os.kill(child, 0)  # the server is up
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 20
    while time.time() < deadline and _alive(child):
        time.sleep(0.2)
    if _alive(child):
        os.kill(child, signal.SIGKILL)
        pytest.fail("the teacher server outlived the process that started it")


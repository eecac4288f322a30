"""The SGLang path: its launch command uses SGLang's own flag names; without sglang/CUDA it fails
clearly; with both, a real server is launched, synced and compared (GPU smoke test)."""
import importlib.util

import pytest
import torch
from helpers import REPO

from megatron_opd.wire.sglang import SGLANG_FLAGS, SGLangServerConfig, SGLangUnavailable, check_available, launch

HAVE_SGLANG = importlib.util.find_spec("sglang") is not None and torch.cuda.is_available()


def test_command_uses_sglang_flag_names():
    cmd = SGLangServerConfig("/models/x", port=31000, tp_size=2, api_key="k", context_length=4096).command()
    assert cmd[1:3] == ["-m", "sglang.launch_server"]
    flags = [a for a in cmd if a.startswith("--")]
    assert set(flags) <= SGLANG_FLAGS
    assert cmd[cmd.index("--tp-size") + 1] == "2" and cmd[cmd.index("--port") + 1] == "31000"
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"  # loopback unless told otherwise


@pytest.mark.skipif(HAVE_SGLANG, reason="sglang + CUDA are present")
def test_missing_sglang_or_cuda_is_a_clear_error():
    with pytest.raises(SGLangUnavailable, match="missing"):
        check_available()
    with pytest.raises(SGLangUnavailable):
        launch(SGLangServerConfig("/models/x"))


@pytest.mark.skipif(not HAVE_SGLANG, reason="needs sglang and a CUDA GPU")
def test_gpu_smoke_real_sglang_server():  # pragma: no cover - GPU only
    """Real server: generate, sync weights (disk), compare log-probs with the embedded engine."""

    from megatron_opd.records import SamplingParams
    from megatron_opd.rollout.embedded import EmbeddedEngine

    world = REPO / "assets" / "tiny"
    proc, client = launch(SGLangServerConfig(str(world / "teachers" / "arithmetic"), port=31555, dtype="float32"))
    try:
        prompt = [2, 90, 88, 74, 87, 4, 70, 73, 73, 5, 22, 23, 24, 5, 16, 5, 24, 25, 26, 3, 4, 2]
        assert client.generate([prompt], SamplingParams(temperature=0.0, max_new_tokens=8))[0].completion_ids
        client.pause()
        client.update_weights_from_disk(str(world / "original"), "1")
        client.resume()
        assert client.model_info()["weight_version"] == "1"
        _served_weights_and_logprobs_match(client, EmbeddedEngine(world / "original"), prompt, atol=1e-3)
    finally:
        proc.kill()


def _served_weights_and_logprobs_match(client, reference, prompt, atol):
    """What the GPU smoke test checks of a server that loaded ``reference``'s weights (run on CPU
    against `opd serve` too, so the engine records it reads are the current ones)."""
    name = "model.layers.0.mlp.down_proj.weight"
    served = torch.tensor(client.get_weights_by_name(name, truncate_size=10**6))
    assert torch.allclose(served, reference.get_weight(name), atol=1e-6)
    ours = reference.score([prompt], [1])[0]["logprobs"].tolist()
    theirs = client.score([prompt], start=1)[0]
    assert len(ours) == len(theirs) == len(prompt) - 1
    assert max(abs(a - b) for a, b in zip(ours, theirs)) < atol


def test_the_gpu_smoke_checks_run_against_the_embedded_server():

    from helpers import start_rollout_server

    from megatron_opd.rollout.embedded import EmbeddedEngine
    from megatron_opd.wire.client import SGLangClient

    model = REPO / "assets" / "tiny" / "original"
    url, proc = start_rollout_server(model)
    try:
        prompt = [2, 90, 88, 74, 87, 4, 70, 73, 73, 5, 22, 23, 24, 5, 16, 5, 24, 25, 26, 3, 4, 2]
        _served_weights_and_logprobs_match(SGLangClient(url), EmbeddedEngine(model), prompt, atol=1e-5)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

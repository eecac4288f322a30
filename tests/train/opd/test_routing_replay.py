"""Routing replay, from the engine to the trainer's micro-batches: the experts each sample's tokens were routed
to travel with it (in SGLang's wire form from a server, packed in the step batch, split over DP ranks, padded
in micro-batches), and recipes that cannot replay are refused before anything starts."""
import base64

import httpx
import pytest
import torch

from helpers import REPO, make_tiny_hf, start_rollout_server
from megatron_opd.config import ConfigError, load_recipe
from megatron_opd.records import Prompt, Rollout, SamplingParams, StepBatch
from megatron_opd.train.batches import micro_batches
from megatron_opd.train.opd.step_maker import build_step_batch
from megatron_opd.wire.client import RoutedShape, SGLangClient, ServerError, decode_routed_experts

RECIPE = REPO / "recipes" / "tiny" / "opd_arith.yaml"


def _rollouts(lengths, layers=3, k=2, experts=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, (p, c) in enumerate(lengths):
        routed = torch.rand(p + c - 1, layers, experts, generator=g).argsort(-1)[..., :k].to(torch.uint8)
        out.append(Rollout(list(range(1, p + 1)), [50 + i] * c, [-0.1] * c, "stop", "step-0", i, 0, routed))
    return out


def test_each_samples_experts_reach_its_micro_batch_row_through_the_wire_form_and_dp_split():
    lengths = [(3, 5), (6, 2), (2, 9), (4, 1)]
    rollouts = _rollouts(lengths)
    prompts = [Prompt(r.prompt_ids, "d", row=i) for i, r in enumerate(rollouts)]
    batch = build_step_batch(prompts, rollouts, None, "token", 0)
    assert batch.routed_experts.shape == (sum(p + c for p, c in lengths), 3, 2)
    assert batch.routed_experts.dtype == torch.uint8
    header, tensors = batch.to_wire()
    batch = StepBatch.from_wire(header, tensors)
    for lo, hi in ((0, 2), (2, 4)):  # two data-parallel ranks' shares
        share = batch.select(lo, hi)
        for m in micro_batches(share, 1, pad_id=0):
            row = m.input_ids[0].tolist()
            i = row[-1] - 50  # the sample's completion ids are 50 + its index
            p, c = lengths[i]
            assert m.routed.shape == (1, p + c, 3, 2)
            assert torch.equal(m.routed[0, : p + c - 1], rollouts[i].routed_experts)
            assert m.routed[0, p + c - 1].tolist() == [[0, 1]] * 3  # the last token: never run by the sampler
        two = micro_batches(share, 2, pad_id=0)[0]  # padded to the longer row: padding holds experts 0..k-1
        short = int(two.seq_len.min())
        assert (two.routed[1, short:] == torch.tensor([0, 1], dtype=torch.uint8)).all()


def test_a_sample_without_its_experts_is_named():
    rollouts = _rollouts([(3, 4), (2, 2)])
    prompts = [Prompt(r.prompt_ids, "d", row=i) for i, r in enumerate(rollouts)]
    rollouts[1].routed_experts = rollouts[1].routed_experts[:-1]
    with pytest.raises(ValueError, match=r"sample 0 of prompt 1 .* shape \(2, 3, 2\), expected \[3, layers"):
        build_step_batch(prompts, rollouts, None, "token", 0)


def test_sglangs_routed_experts_form_decodes_and_bad_payloads_are_refused():
    shape = RoutedShape(layers=2, top_k=2, experts=4)
    values = torch.tensor([[[0, 3], [1, 2]], [[2, 1], [3, 0]]], dtype=torch.int32)
    text = base64.b64encode(values.numpy().tobytes()).decode()
    assert torch.equal(decode_routed_experts(text, shape, 2), values.to(torch.uint8))
    with pytest.raises(ServerError, match="8 values, expected 12"):
        decode_routed_experts(text, shape, 3)
    with pytest.raises(ServerError, match="outside 0..3"):
        decode_routed_experts(base64.b64encode((values + 2).numpy().tobytes()).decode(), shape, 2)
    with pytest.raises(ServerError, match="not base64"):
        decode_routed_experts("###", shape, 2)
    assert decode_routed_experts("", shape, 0).shape == (0, 2, 2)  # a one-token prompt, nothing generated
    wide = RoutedShape(layers=1, top_k=2, experts=300)  # beyond uint8: int32 (NCCL has no int16)
    big = torch.tensor([[[299, 7]]], dtype=torch.int32)
    assert decode_routed_experts(base64.b64encode(big.numpy().tobytes()).decode(), wide, 1).dtype == torch.int32


@pytest.fixture(scope="module")
def moe_server(tmp_path_factory):
    path = make_tiny_hf(tmp_path_factory.mktemp("moe") / "qwen3_moe", "qwen3_moe", seed=3)
    url, proc = start_rollout_server(path, extra_args=["--enable-return-routed-experts"])
    yield path, url
    proc.terminate()
    proc.wait(timeout=30)


def test_the_embedded_server_returns_each_tokens_experts_as_sglang_does(moe_server):
    """/generate with return_routed_experts: meta_info.routed_experts (base64 int32 [tokens, layers, k]) are the
    experts transformers' routers pick over the finished sequence, from routed_experts_start_len on; the client
    asks for them and decodes them into the rollout, streamed or not."""
    from transformers import AutoModelForCausalLM

    path, url = moe_server
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    prompts = [[5, 17, 33, 2], [7, 8, 9, 10, 11, 12]]
    sampling = SamplingParams(temperature=1.0, max_new_tokens=6, seed=3, n=2)
    client = SGLangClient(url, routed_experts=RoutedShape(4, 2, 4))
    streamed = []
    for rollouts in (client.generate(prompts, sampling), client.generate(prompts, sampling, lambda j, r: streamed.append(r))):
        assert len(rollouts) == 4
        for r in rollouts:
            sequence = r.prompt_ids + r.completion_ids
            with torch.no_grad():
                logits = model(torch.tensor([sequence]), output_router_logits=True).router_logits
            expected = torch.stack([layer[: len(sequence) - 1].topk(2, dim=-1).indices for layer in logits], 1)
            assert torch.equal(r.routed_experts.long(), expected)
    assert len(streamed) == 4
    body = {"input_ids": prompts[0], "sampling_params": {"max_new_tokens": 3, "temperature": 0.0},
            "return_routed_experts": True, "routed_experts_start_len": 2}
    meta = httpx.post(url + "/generate", json=body).json()["meta_info"]
    raw = torch.frombuffer(bytearray(base64.b64decode(meta["routed_experts"])), dtype=torch.int32)
    assert raw.numel() == (len(prompts[0]) + 3 - 1 - 2) * 4 * 2  # positions [2, prompt + completion - 1)
    for change, field in (({"routed_experts_start_len": 7}, "routed_experts_start_len 7"),
                          ({"routed_experts_start_len": -1}, "routed_experts_start_len"),
                          ({"sampling_params": {"max_new_tokens": 0}}, "max_new_tokens > 0")):
        bad = httpx.post(url + "/generate", json={**body, **change})
        assert bad.status_code == 400 and field in bad.json()["error"], bad.text


def test_a_server_started_without_the_flag_or_serving_a_dense_model_refuses_the_request(tmp_path):
    dense = make_tiny_hf(tmp_path / "qwen3", "qwen3", seed=1)
    url, proc = start_rollout_server(dense, extra_args=["--enable-return-routed-experts"])
    try:
        body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}, "return_routed_experts": True}
        bad = httpx.post(url + "/generate", json=body)
        assert bad.status_code == 400 and "no experts" in bad.json()["error"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_server_without_the_flag_refuses(moe_server, tmp_path):
    path, _ = moe_server
    url, proc = start_rollout_server(path)
    try:
        body = {"input_ids": [1, 2, 3], "sampling_params": {"max_new_tokens": 2}, "return_routed_experts": True}
        bad = httpx.post(url + "/generate", json=body)
        assert bad.status_code == 400 and "--enable-return-routed-experts" in bad.json()["error"]
        with pytest.raises(ServerError, match="HTTP 400"):
            SGLangClient(url, routed_experts=RoutedShape(4, 2, 4)).generate([[1, 2]], SamplingParams(max_new_tokens=2))
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("overrides,field", [
    (["rollout.engine=vllm", "rollout.sync=disk"], "vLLM's server does not have"),
    (["model.recompute=full"], "recompute"),
    (["rollout.on_policy_fraction=0.5", "loss.kind=topk_forward_kl", "loss.top_k=4"], "on_policy_fraction"),
])
def test_recipes_that_cannot_replay_are_refused(overrides, field):
    with pytest.raises(ConfigError, match=field):
        load_recipe(RECIPE, ["train.routing_replay=true", *overrides])


def test_load_balancing_needs_a_type_and_a_weight_together():
    with pytest.raises(ConfigError, match="load_balancing 'aux_loss' with aux_loss_coeff 0.0"):
        load_recipe(RECIPE, ["model.moe.load_balancing=aux_loss"])
    cfg = load_recipe(RECIPE, ["model.moe.load_balancing=aux_loss", "model.moe.aux_loss_coeff=0.01",
                               "model.moe.z_loss_coeff=0.001"])
    assert cfg.model.moe.overrides() == {"moe_router_load_balancing_type": "aux_loss", "moe_aux_loss_coeff": 0.01,
                                         "moe_z_loss_coeff": 0.001}


def test_a_dense_student_cannot_replay_and_the_run_says_so_before_starting(tmp_path):
    from helpers import opd

    dense = make_tiny_hf(tmp_path / "qwen3", "qwen3", seed=1)
    run = opd("run", str(RECIPE), f"model.hf_path={dense}", "train.routing_replay=true", "eval.world_dir=null",
              f"run.output_dir={tmp_path / 'out'}", check=False)
    assert run.returncode != 0 and "is a dense model (no experts to replay)" in run.stderr
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_client_server_and_launchers_use_sglangs_recorded_names():
    """The recorded contract (wire/contracts/sglang-0.5.23-routed-experts.json) is what every side uses."""
    import json

    from megatron_opd.launch.slurm import ROUTED_FLAG
    from megatron_opd.wire.contract import CONTRACT
    from megatron_opd.wire.sglang import SGLANG_FLAGS

    recorded = json.loads((CONTRACT.parent / "sglang-0.5.23-routed-experts.json").read_text())
    assert recorded["server_flag"] == ROUTED_FLAG and ROUTED_FLAG in SGLANG_FLAGS
    schema = json.loads(CONTRACT.read_text())
    fields = json.dumps(schema)
    assert all(f'"{name}"' in fields for name in recorded["request"])
    assert recorded["response"]["field"] == "meta_info.routed_experts"

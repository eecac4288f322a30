"""The embedded engine's lean decoder against transformers, on every architecture it runs."""
import pytest
import torch

from megatron_opd.rollout.decoder import Decoder, UnsupportedModelError, prefill_mask
from megatron_opd.rollout.generation import continuation_hidden, generate, score_tokens


def _model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _teacher_forced(model, prompt, completion):
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama", "qwen3_moe"])
def test_greedy_ids_equal_transformers_generate_across_a_ragged_batch(tiny_hf, arch):
    model = _model(tiny_hf[arch])
    torch.manual_seed(1)
    prompts = [torch.randint(1, 131, (n,)).tolist() for n in (3, 11, 7, 20, 1)]
    eos = 5  # a common-enough id that some rows stop early and the batch is compacted
    ours = generate(model, prompts, 24, eos, 0, temperature=0.0)
    for prompt, completion in zip(prompts, ours):
        expected = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=24, eos_token_id=eos,
                                  pad_token_id=0)[0, len(prompt):].tolist()
        assert completion.token_ids == expected[: len(completion.token_ids)] and len(completion.token_ids) == len(expected)
        assert completion.finish_reason == ("stop" if expected[-1] == eos else "length")
        table = _teacher_forced(model, prompt, completion.token_ids)
        picked = table.gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(completion.logprobs), picked, atol=1e-5)


def test_sampled_rows_that_stop_early_leave_the_batch_and_the_rest_stay_exact(tiny_hf):
    """Sampling at T=1 with a frequent stop token: rows finish at many different steps (the batch
    compacts several times); every row's log-probs are still the model's own, teacher-forced."""
    model = _model(tiny_hf["qwen3"])
    torch.manual_seed(2)
    prompts = [torch.randint(1, 131, (int(n),)).tolist() for n in torch.randint(2, 30, (24,))]
    stops = tuple(range(10, 30))  # ~15% of the vocabulary ends a row
    a = generate(model, prompts, 40, 9, 0, temperature=1.0, seed=7, stop_token_ids=stops)
    b = generate(model, prompts, 40, 9, 0, temperature=1.0, seed=7, stop_token_ids=stops)
    assert [c.token_ids for c in a] == [c.token_ids for c in b]  # seeded
    lengths = {len(c.token_ids) for c in a}
    assert len(lengths) > 4  # rows really did stop at different steps
    for prompt, completion in zip(prompts, a):
        if completion.finish_reason == "stop":
            assert completion.token_ids[-1] in stops + (9,) and not set(completion.token_ids[:-1]) & set(stops + (9,))
        else:
            assert len(completion.token_ids) == 40
        table = _teacher_forced(model, prompt, completion.token_ids)
        picked = table.gather(-1, torch.tensor(completion.token_ids)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(completion.logprobs), picked, atol=1e-5)


@pytest.mark.parametrize("arch,chunk_bytes", [("llama", None), ("llama", 4 * 131 * 5), ("qwen3_moe", None)])
def test_prefix_shared_scoring_equals_a_full_forward(tiny_hf, monkeypatch, arch, chunk_bytes):
    """(chunk_bytes: the vocabulary's logits 5 positions at a time)"""
    from megatron_opd.rollout import generation

    if chunk_bytes:
        monkeypatch.setattr(generation, "LOGITS_CHUNK_BYTES", chunk_bytes)
    model = _model(tiny_hf[arch])
    torch.manual_seed(3)
    prefixes = [torch.randint(1, 131, (n,)).tolist() for n in (9, 4, 15)]
    group = [0, 0, 1, 2, 2, 2]
    continuations = [torch.randint(1, 131, (n,)).tolist() for n in (6, 1, 12, 3, 8, 2)]
    wanted = [[5, 7], [1], [9, 2, 3], [4], [130, 0], [8]]
    decoder = Decoder(model)
    hidden = continuation_hidden(decoder, prefixes, group, continuations, pad_id=0)
    scores = score_tokens(decoder, hidden, continuations, top_k=4, token_ids=wanted)
    offset = 0
    for b, (g, cont) in enumerate(zip(group, continuations)):
        reference = _teacher_forced(model, prefixes[g], cont)  # [len, V] log-softmax
        here = slice(offset, offset + len(cont))
        assert torch.allclose(scores.logprobs[here], reference.gather(-1, torch.tensor(cont)[:, None])[:, 0], atol=2e-5)
        values, ids = reference.topk(4, -1)
        assert torch.equal(scores.top_ids[here], ids) and torch.allclose(scores.top_logprobs[here], values, atol=2e-5)
        assert torch.allclose(scores.ids_logprobs[b], reference[:, wanted[b]], atol=2e-5)
        offset += len(cont)
    assert offset == len(scores.logprobs)


def test_packed_weights_give_the_plain_forward(tiny_hf):
    """Decoding with oneDNN-packed weights (what generation uses) equals the plain F.linear forward."""
    from megatron_opd.rollout.decoder import packing_available

    if not packing_available():
        pytest.skip("this torch build has no oneDNN packed linear")
    model = _model(tiny_hf["qwen3"])
    decoder = Decoder(model)
    prompts = [torch.randint(1, 131, (n,)).tolist() for n in (5, 9)]
    plain = continuation_hidden(decoder, [prompts[0]], [0, 0], [prompts[1], prompts[1][:3]], pad_id=0)
    decoder.pack()
    packed = continuation_hidden(decoder, [prompts[0]], [0, 0], [prompts[1], prompts[1][:3]], pad_id=0)
    decoder.unpack()
    assert torch.allclose(plain, packed, atol=1e-5) and not torch.equal(plain, torch.zeros_like(plain))


def test_moe_routing_is_the_routers_own_choice_token_by_token(tiny_hf):
    """The experts the decoder runs for each token are the ones transformers' router picks, layer by layer."""
    model = _model(tiny_hf["qwen3_moe"])
    decoder = Decoder(model)
    ids = torch.randint(1, 131, (2, 9), generator=torch.Generator().manual_seed(4))
    positions = torch.arange(9)[None].expand(2, 9)
    routed: list[torch.Tensor] = []
    decoder.forward(ids, positions, decoder.new_cache(2, 9), 0, prefill_mask(torch.ones(2, 9, dtype=torch.bool)),
                    routed=routed)
    with torch.no_grad():
        router_logits = model(ids, output_router_logits=True).router_logits
    assert len(routed) == len(router_logits) == 4
    for ours, theirs in zip(routed, router_logits):
        expected = theirs.view(2, 9, 4).topk(2, dim=-1).indices
        assert torch.equal(ours, expected)
    assert len(torch.cat([r.flatten() for r in routed]).unique()) == 4  # every expert served some token


def test_generation_records_every_tokens_experts_through_prefill_decode_and_compaction(tiny_hf):
    """Sampled rows of ragged prompts that stop at many steps (the batch compacts): each completion's routed
    experts [prompt + completion - 1, layers, k] are transformers' router choices over the finished
    sequence, token by token (prompt tokens from the prefill, the rest from decode steps)."""
    model = _model(tiny_hf["qwen3_moe"])
    torch.manual_seed(3)
    prompts = [torch.randint(1, 131, (int(n),)).tolist() for n in torch.randint(2, 14, (10,))]
    done = {}
    out = generate(model, prompts, 20, 9, 0, temperature=1.0, seed=5, stop_token_ids=tuple(range(10, 24)),
                   routed_experts=True, on_complete=lambda i, c: done.__setitem__(i, c))
    assert len({len(c.token_ids) for c in out}) > 3  # rows ended at different steps
    for i, (prompt, completion) in enumerate(zip(prompts, out)):
        sequence = prompt + completion.token_ids
        routed = completion.routed_experts
        assert routed.dtype == torch.uint8 and routed.shape == (len(sequence) - 1, 4, 2)
        assert torch.equal(done[i].routed_experts, routed)  # streamed the same
        with torch.no_grad():
            router_logits = model(torch.tensor([sequence]), output_router_logits=True).router_logits
        for layer, logits in enumerate(router_logits):
            expected = logits[: len(sequence) - 1].topk(2, dim=-1).indices
            assert torch.equal(routed[:, layer].long(), expected), (i, layer)


def test_a_dense_model_has_no_experts_to_record(tiny_hf):
    with pytest.raises(ValueError, match="without experts"):
        generate(_model(tiny_hf["qwen3"]), [[1, 2, 3]], 4, 9, 0, routed_experts=True)


def test_prefill_mask_never_leaves_a_row_empty():
    valid = torch.tensor([[False, False, True, True], [True, True, True, True]])
    mask = prefill_mask(valid)[:, 0]
    assert mask.any(-1).all()
    assert mask[0, 3].tolist() == [False, False, True, True] and mask[1, 1].tolist() == [True, True, False, False]


def test_unsupported_architectures_are_named(tiny_hf):
    model = _model(tiny_hf["llama"])
    model.config.model_type = "mixtral"
    with pytest.raises(UnsupportedModelError, match="mixtral"):
        Decoder(model)

"""Qwen3-MoE students: built by megatron-core from an HF checkpoint at (TP, PP, DP, EP) on CPU, their logits
held to transformers' own Qwen3-MoE model, their export to the checkpoint they were loaded from, bit for bit."""
import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, assert_trains_like, torchrun, train_at_layouts
from megatron_opd.model.hf_config import UnsupportedArchitectureError, check_parallel_fit, read_config_json

WORKERS = REPO / "tests" / "workers"


@pytest.fixture(scope="module")
def moe_checkpoints(tmp_path_factory):
    from megatron_opd.model.tiny import make_tiny_qwen3_moe

    root = tmp_path_factory.mktemp("moe")
    return {
        # renormalised top-k, tied embeddings (the tiny world's form)
        "norm_tied": make_tiny_qwen3_moe(root / "norm_tied", 96, seed=1, tied=True, norm_topk_prob=True),
        # the softmax weights of the top k as they are, untied
        "plain_untied": make_tiny_qwen3_moe(root / "plain_untied", 96, seed=2, tied=False, norm_topk_prob=False),
    }


def _reference(hf_dir, input_ids):
    """transformers' logits and the experts its router picked (per layer, over all tokens)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        out = model(input_ids, output_router_logits=True)
    top_k = model.config.num_experts_per_tok
    return out.logits, [set(layer.topk(top_k, dim=-1).indices.flatten().tolist()) for layer in out.router_logits]


@pytest.mark.slow
# each layout once, each variant where it matters: the tied embedding split across pipeline stages (norm_tied at
# PP2), the untied head alone and under EP (the replay test below runs the other pairings)
@pytest.mark.parametrize("variant,tp,pp,dp,ep", [("plain_untied", 1, 1, 1, 1), ("norm_tied", 1, 2, 1, 1),
                                                 ("plain_untied", 1, 1, 2, 2), ("norm_tied", 2, 1, 2, 2)])
def test_logits_equal_transformers_and_the_export_is_the_checkpoint(moe_checkpoints, tmp_path, variant, tp, pp, dp, ep):
    hf_dir = moe_checkpoints[variant]
    input_ids = torch.randint(4, 96, (2, 13), generator=torch.Generator().manual_seed(7))
    torch.save(input_ids, tmp_path / "input_ids.pt")
    torchrun(tp * pp * dp, [str(WORKERS / "moe_worker.py"), str(tp), str(pp), str(ep), str(hf_dir), str(tmp_path)])
    ours = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    reference, picked = _reference(hf_dir, input_ids)
    assert picked == [set(range(4))] * 2  # every expert of every layer served some token: all of them were held
    assert ours.shape == reference.shape
    assert torch.allclose(ours, reference, atol=2e-5, rtol=1e-5), (ours - reference).abs().max()
    original = load_file(str(hf_dir / "model.safetensors"))
    exported = load_file(str(tmp_path / "exported.safetensors"))
    assert set(exported) == set(original)
    for name, tensor in original.items():
        assert torch.equal(exported[name], tensor), name


def test_layouts_an_moe_student_cannot_take_are_refused_before_any_process(moe_checkpoints, tmp_path):
    config = read_config_json(moe_checkpoints["norm_tied"])
    assert config.num_experts == 4
    with pytest.raises(ValueError, match=r"num_experts \(4\) must be divisible by ep=3"):
        check_parallel_fit(config, 1, 1, ep=3)
    check_parallel_fit(config, 2, 1, ep=2)  # TP x EP: sequence parallel
    dense = read_config_json(REPO / "assets" / "tiny" / "student_init")
    with pytest.raises(ValueError, match="ep=2 needs an MoE model"):
        check_parallel_fit(dense, 1, 1, ep=2)
    config.mlp_only_layers = [1]
    with pytest.raises(UnsupportedArchitectureError, match=r"mlp_only_layers=\[1\]"):
        check_parallel_fit(config, 1, 1)


@pytest.mark.slow
def test_ep2_layouts_train_like_one_rank(tmp_path, tiny_hf):
    """Expert parallelism trains what one rank trains: the dense DP test's fixed step of 8 samples (OPD
    sampled-token, OPD top-k forward KL, SFT: three optimizer steps) on a Qwen3-MoE student at DP2 x EP2,
    PP2 x DP2 x EP2 and TP2 x DP2 x EP2 (sequence parallel, experts split over TP too) gives the single rank's
    losses, token counts and gradient norms. The DP ranks' shares differ in
    rows and lengths; the all-gather dispatcher needs them even (model.forward.even_for_experts)."""
    layouts = [(1, 1, 1, 1), (1, 1, 2, 2), (1, 2, 2, 2), (2, 1, 2, 2)]
    reports = train_at_layouts(tmp_path, tiny_hf["qwen3_moe"], layouts)
    for layout in layouts[1:]:
        assert_trains_like(reports[layout], reports[layouts[0]], layout)


def test_a_recipe_names_ep_that_does_not_divide_dp():
    from megatron_opd.config import ConfigError, load_recipe

    with pytest.raises(ConfigError, match=r"ep \(2\) must divide dp \(1\)"):
        load_recipe(REPO / "recipes" / "tiny" / "sft.yaml", ["parallel.ep=2"])
    assert load_recipe(REPO / "recipes" / "tiny" / "sft.yaml", ["parallel.pp=1", "parallel.dp=2", "parallel.ep=2"]).parallel.ep == 2


def _forced_reference(hf_dir, input_ids, routed):
    """transformers' logits with every layer's router made to pick ``routed`` [b, s, layers, k]: its softmax
    weights at those experts (renormalised over them when ``norm_topk_prob``), as routing replay computes."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    k = routed.shape[-1]
    for index, layer in enumerate(model.model.layers):
        gate = layer.mlp.gate

        def forced(hidden, gate=gate, chosen=routed[:, :, index].reshape(-1, k).long()):
            logits = torch.nn.functional.linear(hidden.reshape(-1, gate.weight.shape[1]), gate.weight)
            weights = torch.softmax(logits, dim=-1, dtype=torch.float32).gather(1, chosen)
            if gate.norm_topk_prob:
                weights = weights / weights.sum(-1, keepdim=True)
            return logits, weights.to(logits.dtype), chosen

        gate.forward = forced
    with torch.no_grad():
        return model(input_ids).logits


@pytest.mark.slow
@pytest.mark.parametrize("variant,tp,pp,dp,ep", [("plain_untied", 1, 2, 1, 1), ("norm_tied", 1, 1, 2, 2),
                                                 ("plain_untied", 2, 1, 2, 2)])
def test_routing_replay_runs_every_token_through_the_experts_it_is_given(moe_checkpoints, tmp_path, variant, tp, pp, dp, ep):
    """Experts drawn at random per token and layer (not the router's choice): megatron's forward with them
    replayed equals transformers' with its routers forced to them, and each expert received exactly the
    tokens routed to it."""
    import json

    hf_dir = moe_checkpoints[variant]
    input_ids = torch.randint(4, 96, (2, 13), generator=torch.Generator().manual_seed(7))
    layers, experts, k = 2, 4, 2
    routed = torch.rand(2, 13, layers, experts, generator=torch.Generator().manual_seed(3)).argsort(-1)[..., :k]
    torch.save(input_ids, tmp_path / "input_ids.pt")
    torch.save(routed.to(torch.uint8), tmp_path / "routed.pt")
    torchrun(tp * pp * dp, [str(WORKERS / "moe_worker.py"), str(tp), str(pp), str(ep), str(hf_dir), str(tmp_path), "replay"])
    ours = load_file(str(tmp_path / "logits.safetensors"))["logits"]
    forced = _forced_reference(hf_dir, input_ids, routed)
    assert torch.allclose(ours, forced, atol=2e-5, rtol=1e-5), (ours - forced).abs().max()
    free, _ = _reference(hf_dir, input_ids)
    assert (ours - free).abs().max() > 1e-2  # the given experts are not the ones the routers would pick
    per_layer = {layer: [0] * experts for layer in range(1, layers + 1)}
    for path in tmp_path.glob("received-*.json"):
        ep_rank = int(path.stem.split("-ep")[1].split("-")[0])
        for layer, counts in json.loads(path.read_text()).items():
            for j, n in enumerate(counts):  # local expert j of EP rank r: global j + r * experts / ep
                # every DP rank ran the same tokens; at TP > 1 each of an expert's TP shards got them all
                per_layer[int(layer)][j + ep_rank * experts // ep] += n / (dp * tp)
    for layer in range(1, layers + 1):
        want = torch.bincount(routed[:, :, layer - 1].flatten(), minlength=experts).tolist()
        padding = 2 * (-(-13 // tp) * tp - 13)  # TP 2 pads the width to a multiple of TP: experts 0..k-1 get those
        want = [n + padding * (e < k) for e, n in enumerate(want)]
        assert per_layer[layer] == want, (layer, per_layer[layer], want)


@pytest.mark.slow
def test_the_routers_auxiliary_losses_equal_their_formulas(moe_checkpoints, tmp_path, pp=2):
    """megatron-core's load-balancing loss (Switch Transformer: E / (k T^2) * sum_e P_e * n_e, P_e the softmax mass
    and n_e the tokens routed to expert e) and z-loss (mean squared log-sum-exp of the router logits), read back per
    layer from its tracker (summed over pipeline stages), against the same sums over transformers' router logits."""
    import json

    hf_dir = moe_checkpoints["plain_untied"]
    input_ids = torch.randint(4, 96, (2, 13), generator=torch.Generator().manual_seed(7))
    torch.save(input_ids, tmp_path / "input_ids.pt")
    torchrun(pp, [str(WORKERS / "moe_worker.py"), "1", str(pp), "1", str(hf_dir), str(tmp_path), "aux"])
    found = json.loads((tmp_path / "router_losses.json").read_text())
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        router_logits = model(input_ids, output_router_logits=True).router_logits
    balance, z = [], []
    for logits in router_logits:  # [T, E]
        tokens, experts = logits.shape
        probs = torch.softmax(logits, -1)
        routed = torch.bincount(logits.topk(2, dim=-1).indices.flatten(), minlength=experts)
        balance.append(float((probs.sum(0) * routed).sum()) * experts / (2 * tokens * tokens))
        z.append(float(torch.logsumexp(logits, -1).square().mean()))
    assert set(found) == {"moe/load_balancing_loss", "moe/z_loss"}
    assert found["moe/load_balancing_loss"] == pytest.approx(sum(balance) / len(balance), rel=1e-4)
    assert found["moe/z_loss"] == pytest.approx(sum(z) / len(z), rel=1e-4)

"""torchrun worker: three optimizer steps of the real trainer on one fixed step of samples at a
layout TP x PP x DP (x EP for an MoE student) — OPD sampled-token, OPD top-k forward KL, SFT — each DP rank training on its
share (sent by ``train.batches.distribute``, as in the loop). Rank 0 writes each step's loss, token count and
gradient norm, and the loss after the last step."""
import json
import sys
from functools import partial
from pathlib import Path

import torch

from megatron_opd.config import LossConfig
from megatron_opd.model import build_model, load_hf_config, load_hf_weights
from megatron_opd.model.forward import run_pipeline
from megatron_opd.platform import destroy, init_distributed
from megatron_opd.records import Prompt, Rollout, SampleScores, TokenScores
from megatron_opd.train.common import sum_from_last_stage
from megatron_opd.train.batches import distribute
from megatron_opd.train.opd.update import opd_loss
from megatron_opd.train.optim import OptimSettings, optimizer_step, wrap_for_training
from megatron_opd.train.sft import sft_loss
from megatron_opd.train.batches import micro_batches
from megatron_opd.train.opd.step_maker import build_step_batch

tp, pp, dp, out, hf = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]), sys.argv[5]
ep = int(sys.argv[6]) if len(sys.argv) > 6 else 1
info = init_distributed(tp, pp, dp, ep=ep)
bundle = build_model(load_hf_config(hf), vocab_divisible_by=2)
load_hf_weights(bundle, hf)
state = wrap_for_training(bundle, OptimSettings(lr=1e-3, min_lr=1e-3, decay_steps=10))
state.optimizer.reload_model_params()
vocab, top_k = bundle.vocab_size, 8

batch = None
if info.rank == 0:  # one step of 8 samples, as rank 0's producer makes it
    g = torch.Generator().manual_seed(0)
    prompts, rollouts, scored = [], [], []
    for i, (p, c) in enumerate([(5, 9), (3, 14), (6, 4), (4, 11), (7, 7), (2, 16), (5, 6), (3, 10)]):
        prompts.append(Prompt(torch.randint(0, vocab, (p,), generator=g).tolist(), "d", row=i))
        completion = torch.randint(0, vocab, (c,), generator=g).tolist()
        rollouts.append(Rollout(prompts[-1].ids, completion, (-torch.rand(c, generator=g) * 3).tolist(), "stop", "step-0", i))
        top_lp, top_ids = torch.log_softmax(torch.randn(c, vocab, generator=g) * 2, -1).topk(top_k, -1)
        scores = TokenScores(top_lp[:, 0] - torch.rand(c, generator=g), top_ids, top_lp)
        scored.append(SampleScores({"t": scores}, {"t": torch.ones(c)}))
    batch = build_step_batch(prompts, rollouts, scored, "token", top_k)
share = distribute(batch, dp)
micro = micro_batches(share, 2, pad_id=0)

losses = [("opd_sampled_token", partial(opd_loss, LossConfig(kind="sampled_token"), vocab), ("loss_sum", "tokens")),
          ("opd_topk_forward_kl", partial(opd_loss, LossConfig(kind="topk_forward_kl", top_k=top_k), vocab), ("loss_sum", "tokens")),
          ("sft", partial(sft_loss, vocab), ("nll_sum", "tokens"))]
report = {}
for name, loss_fn, keys in losses:
    totals = sum_from_last_stage(run_pipeline(state.chunks, micro, loss_fn, forward_only=False), keys)
    result = optimizer_step(state)
    report[name] = {"loss": totals[keys[0]] / totals["tokens"], "tokens": totals["tokens"], "grad_norm": result.grad_norm}
with torch.no_grad():
    totals = sum_from_last_stage(run_pipeline(state.chunks, micro, partial(sft_loss, vocab), forward_only=True),
                                 ("nll_sum", "tokens"))
report["after"] = {"loss": totals["nll_sum"] / totals["tokens"], "tokens": totals["tokens"]}
if info.rank == 0:
    (out / f"dp-{tp}x{pp}x{dp}{f'-ep{ep}' if ep > 1 else ''}.json").write_text(json.dumps(report))
destroy()

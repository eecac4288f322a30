"""torchrun worker: five OPD optimizer steps (sampled-token, then top-k forward KL) of the real trainer
on one fixed step of samples, at TP x PP, with the student in ``dtype`` (float32 or bfloat16: megatron's
Float16Module + mixed-precision optimizer). Rank 0 writes each step's loss; for bfloat16 the worker
also checks the precision contract and that the weights a rollout engine receives are the trained
ones: synced into an embedded engine, read back from it into a fresh student at the same layout,
equal to the trained shards bit for bit."""
import json
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_opd.config import LossConfig
from megatron_opd.model import build_model, load_hf_config, load_hf_weights
from megatron_opd.model.forward import run_pipeline
from megatron_opd.platform import destroy, init_distributed
from megatron_opd.records import Prompt, Rollout, SampleScores, TokenScores
from megatron_opd.train.common import sum_from_last_stage
from megatron_opd.train.batches import distribute
from megatron_opd.train.opd.update import opd_loss
from megatron_opd.train.optim import OptimSettings, optimizer_step, wrap_for_training
from megatron_opd.train.batches import micro_batches
from megatron_opd.train.opd.step_maker import build_step_batch
from megatron_opd.train.weight_export import InProcessSink


def main() -> None:
    tp, pp, dtype_name, out, hf = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], Path(sys.argv[4]), sys.argv[5]
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype_name]
    info = init_distributed(tp, pp, 1)
    bundle = build_model(load_hf_config(hf), dtype=dtype, vocab_divisible_by=2)
    load_hf_weights(bundle, hf)
    state = wrap_for_training(bundle, OptimSettings(lr=1e-3, min_lr=1e-3, decay_steps=10))
    state.optimizer.reload_model_params()
    vocab, top_k = bundle.vocab_size, 8

    batch = None
    if info.rank == 0:
        g = torch.Generator().manual_seed(0)
        prompts, rollouts, scored = [], [], []
        for i, (p, c) in enumerate([(5, 9), (3, 14), (6, 4), (4, 11), (7, 7), (2, 16)]):
            prompts.append(Prompt(torch.randint(0, vocab, (p,), generator=g).tolist(), "d", row=i))
            completion = torch.randint(0, vocab, (c,), generator=g).tolist()
            rollouts.append(Rollout(prompts[-1].ids, completion, (-torch.rand(c, generator=g) * 3).tolist(), "stop", "step-0", i))
            top_lp, top_ids = torch.log_softmax(torch.randn(c, vocab, generator=g) * 2, -1).topk(top_k, -1)
            scored.append(SampleScores({"t": TokenScores(top_lp[:, 0] - torch.rand(c, generator=g), top_ids, top_lp)},
                                       {"t": torch.ones(c)}))
        batch = build_step_batch(prompts, rollouts, scored, "token", top_k)
    micro = micro_batches(distribute(batch, 1), 3, pad_id=0)
    kinds = ["sampled_token"] * 3 + ["topk_forward_kl"] * 2
    report = {"loss": [], "grad_norm": []}
    for kind in kinds:
        loss_fn = partial(opd_loss, LossConfig(kind=kind, top_k=top_k), vocab)
        totals = sum_from_last_stage(run_pipeline(state.chunks, micro, loss_fn, forward_only=False), ("loss_sum", "tokens"))
        result = optimizer_step(state)
        report["loss"].append(totals["loss_sum"] / totals["tokens"])
        report["grad_norm"].append(result.grad_norm)

    params = [p for chunk in bundle.chunks for p in chunk.parameters()]
    report["param_dtypes"] = sorted({str(p.dtype) for p in params})
    inner = getattr(state.optimizer, "chained_optimizers", [state.optimizer])
    report["optimizer"] = sorted({type(o).__name__ for o in inner})
    if dtype == torch.bfloat16:
        mains = [m for o in inner for group in o.fp32_from_float16_groups for m in group]
        models = [p for o in inner for group in o.float16_groups for p in group]
        report["main_dtypes"] = sorted({str(m.dtype) for m in mains})
        report["main_params_round_to_model"] = all(torch.equal(m.to(torch.bfloat16), p) for m, p in zip(mains, models))
        report["main_params_carry_more_than_bf16"] = any(not torch.equal(m, m.to(torch.bfloat16).float()) for m in mains)

        # sync to an engine as the loop does, read the engine back into a fresh student, compare shards
        from megatron_opd.rollout.embedded import EmbeddedEngine

        tmp = Path(tempfile.mkdtemp(prefix="bf16-engine-", dir=out)) if info.rank == 0 else None
        engine = EmbeddedEngine(hf) if info.rank == 0 else None
        InProcessSink(engine).push(bundle, "step-5")
        if info.rank == 0:
            assert engine.weight_version == "step-5"
            engine.model.save_pretrained(tmp, safe_serialization=True)
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (Path(hf) / name).is_file():
                    (tmp / name).write_bytes((Path(hf) / name).read_bytes())
        paths = [str(tmp) if tmp else None]
        dist.broadcast_object_list(paths, src=0)
        reread = build_model(load_hf_config(hf), dtype=dtype, vocab_divisible_by=2)
        load_hf_weights(reread, paths[0])
        from megatron.core import parallel_state as ps

        def real_rows(name: str, t: torch.Tensor) -> torch.Tensor:  # the vocabulary padding is not exported
            if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
                start = ps.get_tensor_model_parallel_rank() * t.shape[0]
                return t[: max(0, min(t.shape[0], vocab - start))]
            return t

        mismatched = [n for (n, a), (_, b) in zip(bundle.model.named_parameters(), reread.model.named_parameters())
                      if not torch.equal(real_rows(n, a), real_rows(n, b))]
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mismatched)
        report["engine_mismatched_params"] = sorted({n for names in gathered for n in names})
        report["engine_params_compared"] = len(list(bundle.model.parameters()))
    if info.rank == 0:
        (out / f"{dtype_name}-tp{tp}pp{pp}.json").write_text(json.dumps(report))
    destroy()


if __name__ == "__main__":
    main()

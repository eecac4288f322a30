"""The GPU path, skipped without CUDA (`tools/gpu_check.sh` runs these on a GPU machine): the student at
TP1 on CUDA over an NCCL process group equals transformers, the embedded engine on CUDA generates what
it generates on CPU, and OPD steps run with the student and the engine on the GPU."""
import json

import pytest
import torch
from safetensors.torch import load_file

from helpers import REPO, VOCAB, WORKERS, opd, torchrun

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (tools/gpu_check.sh)")
TEACHER = REPO / "assets" / "tiny" / "teachers" / "arithmetic"


def test_student_on_cuda_over_nccl_equals_transformers(tiny_hf, tmp_path):
    from transformers import AutoModelForCausalLM

    input_ids = torch.randint(0, VOCAB, (4, 17), generator=torch.Generator().manual_seed(7))
    torch.save(input_ids, tmp_path / "input_ids.pt")
    torchrun(1, [str(WORKERS / "parity_worker.py"), "1", "1", str(tmp_path), str(tiny_hf["qwen3"])])
    ours = load_file(tmp_path / "qwen3.safetensors")["logits"].cpu()
    ref = AutoModelForCausalLM.from_pretrained(tiny_hf["qwen3"], dtype=torch.float32).eval()
    with torch.no_grad():
        expected = ref(input_ids).logits
    assert (ours - expected).abs().max().item() < 1e-3  # fp32 on the GPU's kernels against CPU's
    assert json.loads((tmp_path / "qwen3.json").read_text())["backend"] == "nccl"


def test_embedded_engine_on_cuda_generates_what_it_generates_on_cpu():
    from transformers import AutoTokenizer

    from megatron_opd.data.chat import chat_ids
    from megatron_opd.records import SamplingParams
    from megatron_opd.rollout.embedded import EmbeddedEngine

    tok = AutoTokenizer.from_pretrained(str(TEACHER))
    prompts = [chat_ids(tok, [{"role": "user", "content": q}], add_generation_prompt=True) for q in ("12+7=?", "3*4=?")]
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    on_cpu = EmbeddedEngine(TEACHER).generate(prompts, greedy)
    gpu = EmbeddedEngine(TEACHER, device="cuda")
    assert next(gpu.model.parameters()).is_cuda
    on_gpu = gpu.generate(prompts, greedy)
    assert [r.completion_ids for r in on_gpu] == [r.completion_ids for r in on_cpu]
    for a, b in zip(on_gpu, on_cpu):
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-3


def test_opd_steps_with_the_student_and_the_engine_on_the_gpu(tmp_path):
    out = tmp_path / "run"
    opd("run", str(REPO / "recipes" / "tiny" / "opd_arith.yaml"), "model.hf_path=assets/tiny/student_init",
        "parallel.tp=1", "parallel.pp=1", "rollout.engine=embedded", "rollout.device=cuda", "rollout.sync=in_process",
        "rollout.max_staleness=0", "train.steps=3", "train.prompts_per_step=8", "rollout.max_new_tokens=32",
        "train.save_interval=0", "eval.samples=8", "eval.max_new_tokens=24", "run.memory_probe=true",
        f"run.output_dir={out}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for row in rows:
        assert row["opd/train_inference_mismatch"] < 1e-3  # the engine on the GPU holds the trainer's weights
        assert row["train/grad_norm"] > 0 and row["memory/rank0_peak_gpu_mib"] > 0

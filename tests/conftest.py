"""The tests' shared fixtures (tiny HF checkpoints, the tiny world) and the quick/slow summary line."""
import os
from pathlib import Path

import pytest

from helpers import make_tiny_hf

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_hf")
    return {arch: make_tiny_hf(root / arch, arch, seed=i) for i, arch in enumerate(["qwen3", "qwen2", "llama", "qwen3_moe"])}


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> dict[str, Path]:
    """Tokenizer, a random tiny student and count-domain chat data, made by the project's own code."""
    from megatron_opd.data.tokenizer import build_char_tokenizer
    from megatron_opd.data.toy import chat_rows
    from megatron_opd.data.world import write_rows
    from megatron_opd.model.tiny import make_tiny_qwen3

    root = tmp_path_factory.mktemp("tiny_world")
    tok = build_char_tokenizer(root / "tokenizer")
    student = make_tiny_qwen3(root / "student", len(tok), "nano", seed=0, tokenizer_dir=root / "tokenizer")
    test = chat_rows("count", 64, seed=2)
    train = chat_rows("count", 400, seed=1, exclude={r["messages"][0]["content"] for r in test})
    return {
        "root": root,
        "student": student,
        "train": write_rows(train, root / "train.jsonl"),
        "test": write_rows(test, root / "test.jsonl"),
    }


# Seconds each of the longest test files took in CI (2026-12-06, 2 workers on 2 cores; the suite prints them). The
# suite runs a file per worker (`--dist loadfile`), handing files out in collection order: the longest go first, so
# that no long file is left to run alone at the end while the other worker idles (longest-processing-time-first).
LONGEST_FILES = {
    "train/opd/test_run.py": 295, "launch/test_slurm_cluster.py": 227, "data/test_world.py": 182,
    "bench/test_real_shapes.py": 149, "model/test_bridge.py": 132, "serve/test_bad_input.py": 114,
    "train/test_sft.py": 110, "launch/test_slurm.py": 107, "bench/test_benches.py": 101,
    "train/opd/test_self_distill.py": 90, "pipeline/test_cascade.py": 89, "serve/test_rollout_server.py": 80,
    "eval/test_domains.py": 69, "train/opd/test_producer.py": 68, "model/test_moe.py": 110, "train/opd/test_moe_run.py": 100, "pipeline/test_compare.py": 59,
    "model/test_convert.py": 52, "train/test_dp.py": 48, "algo/test_vocab_parallel.py": 37,
    "teachers/test_cross_tokenizer.py": 33, "test_sockets.py": 33,
}


def pytest_collection_modifyitems(session, config, items) -> None:
    tests = Path(__file__).resolve().parent

    def weight(item) -> int:
        return LONGEST_FILES.get(Path(str(item.fspath)).resolve().relative_to(tests).as_posix(), 0)

    items.sort(key=lambda item: -weight(item))  # stable: a file's tests, and the other files, keep their order


def pytest_terminal_summary(terminalreporter) -> None:
    """The slow (real-process, end-to-end) tests and the quick ones, shown apart: count and test time."""
    totals: dict[str, tuple[int, float]] = {}
    by_file: dict[str, float] = {}
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) in ("setup", "call", "teardown"):
                path = report.nodeid.split("::")[0].removeprefix("tests/")
                by_file[path] = by_file.get(path, 0.0) + report.duration
            if getattr(report, "when", None) == "call":
                kind = "slow" if "slow" in report.keywords else "quick"
                count, seconds = totals.get(kind, (0, 0.0))
                totals[kind] = (count + 1, seconds + report.duration)
    for kind, (count, seconds) in sorted(totals.items()):
        terminalreporter.write_line(f"{kind} tests: {count} run, {seconds:.0f} s of test time")
    longest = sorted(by_file.items(), key=lambda kv: -kv[1])[:20]  # LONGEST_FILES above is kept from these
    terminalreporter.write_line("longest files (s): " + ", ".join(f"{path} {seconds:.0f}" for path, seconds in longest))

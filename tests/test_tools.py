"""The repository's tools that CI and users run beside the package: the Python 3.12 wheel check's
classification, the install-line extraction, and tools/gpu_check.sh's argument handling and wheel list."""
import importlib.util
import os
import subprocess
from importlib.metadata import version

from helpers import REPO

GPU_CHECK = REPO / "tools" / "gpu_check.sh"


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_wheels_are_classified_by_their_tags():
    kind = _tool("check_py312_wheels").wheel_kind
    assert kind("torch-2.13.0-cp312-cp312-manylinux_2_28_x86_64.whl", "3.12") == "cp312"
    assert kind("tokenizers-0.22.2-cp39-abi3-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "3.12") == "abi3"
    assert kind("pydantic-2.14.4-py3-none-any.whl", "3.12") == "pure"
    assert kind("ruff-0.17.6-py3-none-manylinux_2_17_x86_64.manylinux2014_x86_64.whl", "3.12") == "any-python"
    assert kind("numpy-2.0.0-cp311-cp311-manylinux_2_17_x86_64.whl", "3.12").startswith("other")
    assert kind("leptonai-0.27.3.tar.gz", "3.12") == "sdist"


def test_install_lines_are_found_in_markdown_up_to_the_end_of_the_command():
    lines = _tool("check_install_lines").install_lines(
        'python3 -m venv .venv && . .venv/bin/activate && pip install "torch==2.13.0" -e ".[dev]"   # 1. install\n'
        'On a GPU `pip install -e ".[sglang]"` adds SGLang; `pip install x; echo done`.\n')
    assert lines == ['pip install "torch==2.13.0" -e ".[dev]"', 'pip install -e ".[sglang]"', "pip install x"]


def _gpu_check(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(GPU_CHECK), *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_gpu_check_explains_itself_and_refuses_bad_arguments():
    shown = _gpu_check("--help")
    assert shown.returncode == 0 and "--fetch-wheels" in shown.stdout and "64 MiB" in shown.stdout
    for args, message in ((["--steps", "0"], "--steps needs a positive integer"), (["--size", "8B"], "--size is 0.6B or 1.7B"),
                          (["--bogus"], "unknown argument '--bogus'"), (["--wheels"], "--wheels needs a directory")):
        done = _gpu_check(*args)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)


def test_gpu_check_on_a_machine_without_a_gpu_stops_before_installing(tmp_path):
    done = _gpu_check("--wheels", str(tmp_path / "none"), "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr
    assert not (tmp_path / "out").exists()


def test_the_gpu_wheels_are_pinned_to_what_this_environment_tests(tmp_path):
    listed = _gpu_check("--list-wheels").stdout.split()
    pins = dict(line.split("==") for line in listed)
    assert {"megatron-core", "mbridge", "transformers", "tokenizers", "safetensors", "fastapi", "pydantic"} <= set(pins)
    for name, pinned in pins.items():
        assert version(name) == pinned, name  # the wheels carried to the GPU are the versions installed here
    assert "torch" not in pins and "numpy" not in pins  # the container's own
    # the check names what is missing from a wheel directory
    (tmp_path / "wheels").mkdir()
    (tmp_path / "wheels" / "mbridge-0.15.1-py3-none-any.whl").write_bytes(b"")
    done = _gpu_check("--check-wheels", "--wheels", str(tmp_path / "wheels"))
    missing = done.stderr.split("missing in")[1].split(":", 1)[1].split()
    assert done.returncode == 1 and "mbridge" not in missing and {"megatron-core", "transformers", "megatron-opd"} <= set(missing)

"""The embedded server on a shared network (issue 18): malformed bodies are 400s naming the field
(never a 500), cost is bounded (context window, body size, per-request token budget), a paused or
busy server answers 503 in bounded time, a generation whose client left is cancelled, SIGTERM
exits in bounded time, and weight updates are all or nothing. Real `opd serve` processes on 127.0.0.1."""
import json
import signal
import threading
import time

import httpx
import pytest
import torch

from helpers import REPO
from megatron_opd.records import SamplingParams
from megatron_opd.rollout.embedded import EmbeddedEngine
from megatron_opd.rollout.generation import GenerationCancelled

TEACHER = REPO / "assets" / "tiny" / "teachers" / "arithmetic"  # vocabulary 100, context 512
RANDOM = REPO / "assets" / "tiny" / "student_init"  # untrained: rarely samples EOS, so generations run long
PROMPT = [2, 90, 88, 74, 87, 4, 70, 73, 73, 5, 22, 23, 24, 5, 16, 5, 24, 25, 26, 3, 4, 2]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("hardening") / "server.log"
    from megatron_opd.wire.process import start_server

    proc = start_server(TEACHER, role="rollout", log_path=log, extra_args=[
        "--max-body-mb", "1", "--max-request-tokens", "20000", "--pause-wait-s", "2", "--group-timeout-s", "2",
        "--weights-root", str(tmp_path_factory.getbasetemp()), "--max-waiting", "1"])
    yield proc.url, log
    proc.stop()


def _gen(**sampling):
    return {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 4, **sampling}}


MALFORMED = [  # (raw body, a piece of the error that names the field)
    ('{"input_ids": true}', "input_ids"),
    ('{"input_ids": [1.5]}', "input_ids"),
    ('{"input_ids": [true, false]}', "input_ids"),
    ('{"input_ids": []}', "input_ids"),
    ('{"input_ids": [1, 100]}', "token ids must be in [0, 100)"),
    (json.dumps(_gen(max_new_tokens=1.5)), "max_new_tokens"),
    (json.dumps(_gen(n=1.5)), "sampling_params.n"),
    (json.dumps(_gen(n=True)), "sampling_params.n"),
    (json.dumps(_gen(top_k=1.5)), "top_k"),
    (json.dumps(_gen(top_p=0)), "top_p"),
    (json.dumps(_gen(temperature=-1)), "temperature"),
    (json.dumps(_gen(stop_token_ids="abc")), "stop_token_ids"),
    (json.dumps(_gen(stop_token_ids=[1000])), "stop_token_ids"),
    (json.dumps(_gen(sampling_seed="x")), "sampling_seed"),
    (json.dumps(_gen(sampling_seed=2**70)), "sampling_seed"),
    (json.dumps(_gen()).replace('"max_new_tokens": 4', '"temperature": NaN'), "NaN"),
    (json.dumps(_gen()).replace('"max_new_tokens": 4', '"temperature": Infinity'), "Infinity"),
    ('[1, 2]', "expected a JSON object"),
    ('{"input_ids": [1, 2', "not JSON"),
    (json.dumps({**_gen(), "return_logprob": "yes"}), "return_logprob"),
    (json.dumps({**_gen(), "return_logprob": True, "logprob_start_len": 1.5}), "logprob_start_len"),
    (json.dumps({**_gen(), "return_logprob": True, "top_logprobs_num": True}), "top_logprobs_num"),
    (json.dumps({**_gen(), "token_ids_logprob": [True]}), "token_ids_logprob"),
    # cost: the context window (512) and the budget (20,000 tokens per request on this server)
    (json.dumps({"input_ids": [5] * 600, "sampling_params": {"max_new_tokens": 1}}), "context window of 512"),
    (json.dumps(_gen(max_new_tokens=10**9)), "context window of 512"),
    (json.dumps({"input_ids": [PROMPT] * 2000, "sampling_params": {"max_new_tokens": 128}}), "split the request"),
    # weight-update and other endpoints: strict types too
    ('{"model_path": 7}', "model_path"),
    ('{"master_address": "127.0.0.1", "master_port": 1.5, "rank_offset": 1, "world_size": 2}', "master_port"),
    ('{"master_address": "127.0.0.1", "master_port": 29999, "rank_offset": 1, "world_size": 2, "backend": "mpi"}', "backend"),
    ('{"name": "model.norm.weight", "truncate_size": true}', "truncate_size"),
    ('{"new_version": ""}', "new_version"),
]
PATHS = {"model_path": "/update_weights_from_disk", "master_address": "/init_weights_update_group",
         "truncate_size": "/get_weights_by_name", "new_version": "/update_weight_version"}


def _path(raw: str) -> str:
    return next((p for key, p in PATHS.items() if f'"{key}"' in raw), "/generate")


@pytest.mark.parametrize("raw,field", MALFORMED, ids=[f"{i}-{f}" for i, (_, f) in enumerate(MALFORMED)])
def test_malformed_bodies_are_400s_naming_the_field(server, raw, field):
    url, _ = server
    started = time.monotonic()
    r = httpx.post(url + _path(raw), content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400, (r.status_code, r.text)
    assert field in r.json()["error"], r.json()["error"]
    assert time.monotonic() - started < 5  # refused before any work


def test_no_tracebacks_and_the_server_still_serves(server):
    url, log = server
    ok = httpx.post(url + "/generate", json=_gen(temperature=0.0), timeout=30)
    assert ok.status_code == 200 and len(ok.json()["output_ids"]) == 4
    assert "Traceback" not in log.read_text()


def test_an_unknown_weight_name_is_a_plain_400_message(server):
    url, _ = server
    r = httpx.post(url + "/get_weights_by_name", json={"name": "model.nope.weight"}, timeout=30)
    assert r.status_code == 400  # the message itself, not a quoted repr of a KeyError
    assert r.json() == {"error": "weight 'model.nope.weight' does not exist in the rollout model"}


def test_body_over_the_limit_is_413(server):
    url, _ = server
    big = json.dumps({"input_ids": [5] * 400_000})  # ~1.2 MB against a 1 MB limit
    r = httpx.post(url + "/generate", content=big, headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413 and "limit" in r.json()["error"]


def test_a_paused_or_overloaded_server_says_so_and_answers_503_in_bounded_time(server):
    url, _ = server
    assert httpx.get(url + "/health").json() == {"status": "ok"}
    assert httpx.post(url + "/pause_generation", json={"mode": "in_place"}).status_code == 200
    try:
        health = httpx.get(url + "/health")
        assert health.status_code == 503 and health.json()["status"] == "paused"  # not ready: routers send work elsewhere
        waiting = {}
        held = threading.Thread(target=lambda: waiting.update(r=httpx.post(url + "/generate", json=_gen(), timeout=30)))
        started = time.monotonic()
        held.start()
        time.sleep(0.5)  # that request now waits on the pause and fills --max-waiting 1
        refused = httpx.post(url + "/generate", json=_gen(), timeout=30)
        assert refused.status_code == 503 and "overloaded: 1 requests in progress" in refused.json()["error"]
        assert time.monotonic() - started < 1.5  # refused at once, not queued
        held.join()
        assert waiting["r"].status_code == 503 and "paused" in waiting["r"].json()["error"]
        assert 1.5 < time.monotonic() - started < 10  # --pause-wait-s 2
    finally:
        httpx.post(url + "/continue_generation", json={})
    assert httpx.get(url + "/health").status_code == 200
    assert httpx.post(url + "/generate", json=_gen(), timeout=30).status_code == 200


def test_weight_update_group_fails_fast(server):
    url, _ = server
    from megatron_opd.platform.net import free_port

    import socket

    silent = socket.create_server(("127.0.0.1", 0))  # accepts connections and never answers: not a torch store
    try:
        for port, says in [(free_port(), "no weight-update master listening"), (silent.getsockname()[1], "did not finish")]:
            started = time.monotonic()  # gives up after --group-timeout-s 2, within a second or two of it
            r = httpx.post(url + "/init_weights_update_group", json={"master_address": "127.0.0.1", "master_port": port,
                                                                    "rank_offset": 1, "world_size": 2, "backend": "gloo"},
                           timeout=60)
            assert r.status_code == 200 and r.json()["success"] is False and says in r.json()["message"], r.json()
            assert time.monotonic() - started < 5
    finally:
        silent.close()


def _weights(url: str, name: str) -> torch.Tensor:
    return torch.tensor(httpx.post(url + "/get_weights_by_name", json={"name": name, "truncate_size": 10**6}).json())


def _greedy(url: str) -> list[int]:
    return httpx.post(url + "/generate", json=_gen(temperature=0.0, max_new_tokens=12), timeout=30).json()["output_ids"]


def test_weight_updates_are_all_or_nothing(server, tmp_path):
    from safetensors.torch import save_file

    url, _ = server
    full = {k: v.clone() for k, v in EmbeddedEngine(TEACHER).model.state_dict().items()}
    norm = "model.norm.weight"
    before, greedy, version = _weights(url, norm), _greedy(url), httpx.get(url + "/model_info").json()["weight_version"]

    def update(path) -> dict:
        r = httpx.post(url + "/update_weights_from_disk", json={"model_path": str(path), "weight_version": "bad"}, timeout=60)
        assert r.status_code == 200
        return r.json()

    def refused(path, why: str) -> None:
        answer = update(path)
        assert answer["success"] is False and why in answer["message"], answer
        assert torch.equal(_weights(url, norm), before) and _greedy(url) == greedy
        assert httpx.get(url + "/model_info").json()["weight_version"] == version

    refused("/etc", "outside the directories")
    refused(REPO / ".." / "..", "outside the directories")
    (tmp_path / "to_dev").symlink_to("/dev")
    refused(tmp_path / "to_dev", "outside the directories")  # a link inside the root, pointing out of it
    zero = tmp_path / "zero"
    zero.mkdir()
    (zero / "model.safetensors").symlink_to("/dev/zero")
    refused(zero, "not a regular file")
    part = tmp_path / "part"
    part.mkdir()
    save_file({norm: torch.zeros_like(full[norm])}, str(part / "model.safetensors"))
    refused(part, "missing")  # 1 of the model's weights: would leave a half-updated model
    ints = tmp_path / "ints"
    ints.mkdir()
    save_file({**full, norm: torch.ones_like(full[norm], dtype=torch.int64)}, str(ints / "model.safetensors"))
    refused(ints, "lossy cast")
    nans = tmp_path / "nans"
    nans.mkdir()
    save_file({**full, norm: torch.full_like(full[norm], float("nan"))}, str(nans / "model.safetensors"))
    refused(nans, "NaN or Inf")
    # a full, finite update in bf16 (a lossless widening into the fp32 engine) is taken as sent
    good = tmp_path / "good"
    good.mkdir()
    halves = {k: (v * 0.5).to(torch.bfloat16) for k, v in full.items()}
    save_file(halves, str(good / "model.safetensors"))
    answer = update(good)
    assert answer["success"] is True, answer
    assert torch.equal(_weights(url, norm), halves[norm].float())
    assert httpx.get(url + "/model_info").json()["weight_version"] == "bad"


def test_engine_generation_stops_when_cancelled():
    engine = EmbeddedEngine(RANDOM)
    cancel = threading.Event()
    threading.Timer(0.5, cancel.set).start()
    started = time.monotonic()
    with pytest.raises(GenerationCancelled):
        engine.generate([PROMPT] * 64, SamplingParams(temperature=1.0, max_new_tokens=480, seed=1), cancel=cancel)
    assert time.monotonic() - started < 5
    # the engine is free again at once
    assert len(engine.generate([PROMPT], SamplingParams(temperature=0.0, max_new_tokens=3))[0].completion_ids) == 3


@pytest.fixture(scope="module")
def random_server(tmp_path_factory):
    from megatron_opd.wire.process import start_server

    log = tmp_path_factory.mktemp("random_server") / "server.log"
    server = start_server(RANDOM, role="rollout", log_path=log, extra_args=["--max-request-tokens", "1000000"])
    yield server.url, server.proc, log
    server.stop()


# greedy from the untrained model runs every row to max_new_tokens: ~20 s of decoding on 2 cores
LONG = {"input_ids": [PROMPT] * 1024, "sampling_params": {"max_new_tokens": 480, "temperature": 0.0}}


def test_a_generation_whose_client_left_is_cancelled(random_server):
    url, _, log = random_server
    started = time.monotonic()
    with pytest.raises(httpx.TimeoutException):  # the client gives up after 1 s
        httpx.post(url + "/generate", json=LONG, timeout=1.0)
    # the next request is served at once, not after the abandoned generation has run to its end
    r = httpx.post(url + "/generate", json=_gen(temperature=0.0), timeout=60)
    assert r.status_code == 200
    assert time.monotonic() - started < 8, "the abandoned generation kept the server busy"
    _poll_log = time.monotonic() + 10
    while "generation cancelled after" not in log.read_text() and time.monotonic() < _poll_log:
        time.sleep(0.2)
    assert "/generate: generation cancelled after" in log.read_text()


def test_sigterm_stops_a_busy_server_in_bounded_time(random_server):
    url, proc, _ = random_server
    threading.Thread(target=lambda: httpx.post(url + "/generate", json=LONG, timeout=120), daemon=True).start()
    time.sleep(1.0)  # generating
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=60)
    assert time.monotonic() - started < 20


def test_a_non_loopback_server_needs_a_key():
    from helpers import opd

    refused = opd("serve", "--model", str(TEACHER), "--host", "0.0.0.0", "--port", "1", check=False, timeout=120)
    assert refused.returncode == 2 and "needs an API key" in refused.stderr


@pytest.mark.slow
def test_a_run_does_not_resume_a_checkpoint_of_another_config(tmp_path, tiny_world):
    """Re-running into a directory whose checkpoint came from different settings stops before anything
    starts, naming the keys; the layout, the step count and the run's place may change."""
    from helpers import opd, sft_recipe

    out = tmp_path / "run"
    recipe = sft_recipe(tiny_world, out, steps=2)
    opd("run", str(recipe))
    stamp = (out / "checkpoints" / "latest").read_text()
    changed = opd("run", str(recipe), "optim.lr=0.01", "train.seed=3", check=False)
    assert changed.returncode == 2, changed.stderr
    assert "different config (optim.lr: 0.003 -> 0.01; train.seed: 7 -> 3)" in changed.stderr
    assert (out / "checkpoints" / "latest").read_text() == stamp  # nothing ran
    more = opd("run", str(recipe), "train.steps=3")  # a longer run of the same config resumes
    assert "resumed from" in more.stdout and "at step 2" in more.stdout
    forced = opd("run", str(recipe), "optim.lr=0.01", "train.steps=4", "train.resume_changed_config=true")
    assert "at step 3" in forced.stdout


WEIRD = [None, True, False, 0, 1, -1, 4, 1.5, 2**70, float("nan"), float("inf"), "", "x", "/etc", [], [True], [1.5],
         [1, 2, 3], [[1, 2], [3]], [[]], {}, {"a": 1}, "model.norm.weight"]
TEMPLATES = {
    "/generate": {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2, "temperature": 0.0, "n": 1, "top_k": -1,
                                                           "top_p": 1.0, "stop_token_ids": [3], "sampling_seed": 1},
                  "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2, "stream": False},
    "/update_weights_from_disk": {"model_path": "/tmp", "weight_version": "x"},
    "/update_weights_from_distributed": {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]],
                                         "weight_version": "x", "load_format": None},
    "/get_weights_by_name": {"name": "model.norm.weight", "truncate_size": 3},
    "/update_weight_version": {"new_version": "fuzz"},
    "/destroy_weights_update_group": {},
    "/continue_generation": {},
}


def _mutate(body: dict, rng) -> dict:
    out = {}
    for key, value in body.items():
        roll = rng.random()
        if roll < 0.15:
            continue  # dropped
        if isinstance(value, dict) and roll < 0.6:
            out[key] = _mutate(value, rng)
        elif roll < 0.55:
            out[key] = rng.choice(WEIRD)
        else:
            out[key] = value
    if rng.random() < 0.1:
        out[rng.choice(["extra", "input_ids", "text"])] = rng.choice(WEIRD)
    return out


def test_fuzzed_bodies_never_get_a_500(server):
    """400 bodies drawn from valid templates with fields dropped or swapped for odd values: every
    answer is a 2xx (a valid draw) or a 4xx, never a 5xx, and the server still serves after."""
    import random

    url, log = server
    rng = random.Random(18)
    statuses = {}
    with httpx.Client(timeout=60) as http:
        for i in range(400):
            path = rng.choice(list(TEMPLATES))
            body = _mutate(TEMPLATES[path], rng)
            r = http.post(url + path, content=json.dumps(body), headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (path, body, r.status_code, r.text)
        assert http.post(url + "/continue_generation", json={}).status_code == 200
    assert sum(v for k, v in statuses.items() if 400 <= k < 500) > 100  # most draws are refused, each as a 4xx
    assert "Traceback" not in log.read_text()
    assert httpx.post(url + "/generate", json=_gen(temperature=0.0), timeout=30).status_code == 200


@pytest.mark.slow
def test_cli_and_config_refuse_nonsense_before_starting(tmp_path, tiny_world):
    from helpers import opd, sft_recipe

    from megatron_opd.config import ConfigError, load_recipe

    import shutil

    recipe = sft_recipe(tiny_world, tmp_path / "run")
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_world["student"], truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ConfigError, match="train.steps.*expected a number, got the boolean true"):
        load_recipe(recipe, ["train.steps=true"])
    with pytest.raises(ConfigError, match="optim.lr.*expected a number, got the boolean false"):
        load_recipe(recipe, ["optim.lr=false"])
    assert load_recipe(recipe, ["train.resume=false"]).train.resume is False  # a real boolean still is one
    for args, message in [
        (["eval", str(TEACHER), "--samples", "0"], "Invalid value for '--samples'"),
        (["eval", str(TEACHER), "--world", str(tmp_path / "nowhere")], "no domains there"),
        (["eval", str(TEACHER), "--domains", "poetry"], "unknown domain(s) ['poetry']"),
        (["convert", "hf-to-megatron", str(TEACHER), str(tmp_path / "x"), "--tp", "0"], "Invalid value for '--tp'"),
        (["convert", "hf-to-megatron", str(TEACHER), str(tmp_path / "x"), "--vocab-divisible-by", "0"],
         "Invalid value for '--vocab-divisible-by'"),
        (["convert", "hf-to-megatron", str(TEACHER), str(recipe)], "exists and is not a directory"),
        (["eval", str(truncated)], "not a readable safetensors file"),
        (["run", str(recipe), f"model.hf_path={truncated}"], "not a readable safetensors file"),
    ]:
        run = opd(*args, check=False, timeout=300)
        assert run.returncode == 2 and message in run.stderr, (args, run.stderr[-2000:])


def test_bad_opd_rows_are_counted_and_skipped(tmp_path):
    """OPD prompt rows the SFT loader would skip are skipped here too (they were tracebacks)."""
    from transformers import AutoTokenizer

    from megatron_opd.data.prompts import load_prompts

    good = {"messages": [{"role": "user", "content": "add 1 + 2"}], "domain": "arithmetic", "meta": '{"answer": 3}'}
    rows = [good,
            {"messages": ["add 1 + 2"]},  # strings, not turns
            {"messages": [{"role": "user", "content": 7}]},
            {**good, "meta": "{not json"},
            {**good, "meta": [1, 2]},
            {**good, "meta": {"answer": 3}}]
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    prompts, skipped, problems = load_prompts([str(path)], AutoTokenizer.from_pretrained(str(TEACHER)), "messages",
                                              "domain", 64)
    assert [p.meta for p in prompts] == [{"answer": 3}, {"answer": 3}]
    assert skipped == {"'messages' entries must be {role, content} objects with string values": 2,
                       "'meta' is a string that is not JSON": 1, "'meta' must be an object (or its JSON text)": 1}
    assert problems[0].endswith("row 1: 'messages' entries must be {role, content} objects with string values")


_DIES_HALF_WAY = """
import os, signal, sys, threading, time
import torch
from megatron_opd.rollout.embedded import EmbeddedEngine
from megatron_opd.rollout.update_group import WeightUpdateGroup, dtype_name
from megatron_opd.wire.client import SGLangClient
url, port, model = sys.argv[1], int(sys.argv[2]), sys.argv[3]
params = EmbeddedEngine(model).model.state_dict()
names = sorted(params)
first, second = names[: len(names) // 2], names[len(names) // 2:]
client = SGLangClient(url)
joining = threading.Thread(target=client.init_weights_update_group, args=("127.0.0.1", port, 1, 2, "gloo"))
joining.start()
group = WeightUpdateGroup("127.0.0.1", port, 0, 2, "gloo", timeout_s=30)
joining.join()
client.pause()
def announce(bucket):
    return threading.Thread(target=client.update_weights_from_distributed, daemon=True, args=(
        bucket, [dtype_name(params[n].dtype) for n in bucket], [list(params[n].shape) for n in bucket], "step-99"))
call = announce(first)
call.start()
for n in first:  # bucket 1 of 2, whole: zeros where the weights were
    group.broadcast(torch.zeros_like(params[n]), root=0)
call.join()
announce(second).start()
group.broadcast(torch.zeros_like(params[second[0]]), root=0)  # bucket 2: one tensor of many, then the trainer dies
print("half-way", flush=True)
time.sleep(0.5)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_weight_sync_that_fails_half_way_leaves_the_old_weights_serving(server):
    import subprocess
    import sys

    from megatron_opd.platform.net import free_port

    url, log = server
    norm = "model.norm.weight"
    before, greedy = _weights(url, norm), _greedy(url)
    version = httpx.get(url + "/model_info").json()["weight_version"]
    trainer = subprocess.run([sys.executable, "-c", _DIES_HALF_WAY, url, str(free_port()), str(TEACHER)],
                             capture_output=True, text=True, timeout=120)
    assert trainer.returncode == -signal.SIGKILL and "half-way" in trainer.stdout, trainer.stderr[-2000:]
    # the server is still paused (nobody continued it); a restarted trainer, or an operator, continues it
    assert httpx.get(url + "/health").json()["status"] == "paused"
    assert httpx.post(url + "/continue_generation", json={}).status_code == 200
    assert httpx.get(url + "/model_info").json()["weight_version"] == version  # not "step-99"
    assert torch.equal(_weights(url, norm), before) and _greedy(url) == greedy  # bucket 1 was never applied
    httpx.post(url + "/destroy_weights_update_group", json={"group_name": "weight_update_group"})

    # a trainer that gives up half-way and continues the server: the half it sent is not applied either
    from megatron_opd.rollout.update_group import WeightUpdateGroup, dtype_name
    from megatron_opd.wire.client import SGLangClient

    client, port = SGLangClient(url), free_port()
    joining = threading.Thread(target=client.init_weights_update_group, args=("127.0.0.1", port, 1, 2, "gloo"))
    joining.start()
    group = WeightUpdateGroup("127.0.0.1", port, 0, 2, "gloo", timeout_s=30)
    joining.join()
    try:
        client.pause()
        zero = torch.zeros_like(before)
        call = threading.Thread(target=client.update_weights_from_distributed,
                                args=([norm], [dtype_name(zero.dtype)], [list(zero.shape)], "step-100"))
        call.start()
        group.broadcast(zero, root=0)
        call.join()
        client.resume()
        assert httpx.get(url + "/model_info").json()["weight_version"] == version
        assert torch.equal(_weights(url, norm), before) and _greedy(url) == greedy
        assert "weight sync not applied" in log.read_text() and "missing" in log.read_text()
    finally:
        client.destroy_weights_update_group()
        group.close()

"""The embedded server at the HTTP layer (serve/rollout_server.py's gate and body reader), probed with raw
bytes over a real socket to a real `opd serve` with an API key: any header bytes compare (401, never
500), a body framed two ways is refused, an unfinished body times out, a client that leaves is one log
line, and fuzzed headers never get a 5xx."""
import random
import socket
import time

import pytest

from helpers import REPO

TEACHER = REPO / "assets" / "tiny" / "teachers" / "arithmetic"
KEY = "s3cret-key"
BODY = b'{"input_ids": [2, 90, 88, 4], "sampling_params": {"max_new_tokens": 2, "temperature": 0.0}}'


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    from megatron_opd.wire.process import start_server

    log = tmp_path_factory.mktemp("framing") / "server.log"
    server = start_server(TEACHER, role="rollout", log_path=log, api_key=KEY, extra_args=["--body-timeout-s", "2"])
    host, port = server.url.split("//")[1].split(":")
    yield (host, int(port)), log
    server.stop()


def _exchange(address, data: bytes, then_wait_s: float = 0.0, timeout: float = 20.0) -> tuple[int | None, bytes, float]:
    """Send ``data``, read until the server closes or has sent a whole response: (status, reply, seconds)."""
    began = time.monotonic()
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(data)
        time.sleep(then_wait_s)
        reply = b""
        try:
            while chunk := sock.recv(65536):
                reply += chunk
                head, sep, body = reply.partition(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), None)
                if sep and length is not None and len(body) >= length:
                    break
        except (ConnectionResetError, socket.timeout):
            pass
    status = int(reply.split(b" ", 2)[1]) if reply.startswith(b"HTTP/1.1 ") else None
    return status, reply, time.monotonic() - began


def _request(headers: list[bytes], body: bytes = BODY, path: bytes = b"/generate") -> bytes:
    return b"POST " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n" + b"".join(h + b"\r\n" for h in headers) + b"\r\n" + body


def _auth(value: bytes = b"Bearer " + KEY.encode()) -> bytes:
    return b"Authorization: " + value


def _length(body: bytes = BODY) -> bytes:
    return b"Content-Length: " + str(len(body)).encode()


def test_the_right_key_is_served_and_any_other_bytes_are_401(keyed):
    address, log = keyed
    assert _exchange(address, _request([_auth(), _length()]))[0] == 200
    for value in [b"Bearer s3cret-k\xc3\xa9y", b"\xff\xfe", b"Bearer " + KEY.encode() + b"\x80", b"", "Bearer ключ".encode()]:
        status, reply, _ = _exchange(address, _request([_auth(value), _length()]))
        assert status == 401 and b"invalid or missing API key" in reply, (value, reply[:300])
    assert _exchange(address, _request([_length()]))[0] == 401  # no header at all
    assert "Traceback" not in log.read_text()


def test_a_body_framed_two_ways_is_400_and_the_connection_closed(keyed):
    address, _ = keyed
    chunked = hex(len(BODY))[2:].encode() + b"\r\n" + BODY + b"\r\n0\r\n\r\n"
    status, reply, _ = _exchange(address, _request([_auth(), _length(), b"Transfer-Encoding: chunked"], chunked))
    assert status == 400 and b"framed two ways" in reply and b"connection: close" in reply.lower()
    status, reply, _ = _exchange(address, _request([_auth(), _length(), b"Content-Length: 7"]))
    assert status == 400  # lengths that disagree: refused (by h11 itself or by the gate)
    # chunked alone is a body framed one way: served
    assert _exchange(address, _request([_auth(), b"Transfer-Encoding: chunked"], chunked))[0] == 200


def test_an_unfinished_body_is_408_after_the_body_timeout(keyed):
    address, _ = keyed
    head = _request([_auth(), b"Transfer-Encoding: chunked"], b"10\r\n{\"input_ids\"")  # a chunk begun, never ended
    status, reply, seconds = _exchange(address, head)
    assert status == 408 and b"did not arrive in full within 2 s" in reply, reply[:300]
    assert 1.5 < seconds < 10  # --body-timeout-s 2


def test_a_client_that_leaves_mid_body_is_one_log_line(keyed):
    address, log = keyed
    with socket.create_connection(address, timeout=10) as sock:
        sock.sendall(_request([_auth(), b"Content-Length: 1000"], b'{"input_ids": ['))
        time.sleep(0.3)
    deadline = time.monotonic() + 10
    while "disconnected before its request body" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.2)
    text = log.read_text()
    assert text.count("the client disconnected before its request body arrived in full") == 1, text[-2000:]
    assert "Traceback" not in text and "ClientDisconnect" not in text


WEIRD_VALUES = [b"\xff" * 8, "é".encode(), b"\x00", b"\x7f", b"a" * 20_000, b"a" * 100_000, b" ", b"-1", b"1e3", b"0x10",
                b"chunked, gzip", b"gzip", b"Bearer", b"Bearer " + KEY.encode() + b" extra", b"\t", b"\r"]
NAMES = [b"Authorization", b"Content-Length", b"Transfer-Encoding", b"Content-Type", b"Accept", b"X-\xff", b"Host"]


def test_fuzzed_headers_never_get_a_5xx(keyed):
    """Headers drawn from valid requests with values swapped for odd bytes (non-ASCII, NUL, 100 kB, bad numbers),
    framing doubled or conflicting, names repeated: every answer is a 4xx or a 2xx, and the server still serves."""
    address, log = keyed
    rng = random.Random(30)
    statuses = {}
    for _ in range(150):
        headers = [_auth(), _length(), b"Content-Type: application/json"]
        for _ in range(rng.randint(1, 3)):
            name, value = rng.choice(NAMES), rng.choice(WEIRD_VALUES)
            if rng.random() < 0.5:
                headers = [h for h in headers if not h.lower().startswith(name.lower() + b":")]
            headers.insert(rng.randrange(len(headers) + 1), name + b": " + value)
        status, reply, _ = _exchange(address, _request(headers), timeout=10)
        statuses[status] = statuses.get(status, 0) + 1
        assert status is not None and status < 500, (headers, reply[:300])
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) > 50, statuses
    assert _exchange(address, _request([_auth(), _length()]))[0] == 200
    assert "Traceback" not in log.read_text()

"""Starting `opd serve` processes: a port picked free but taken before the server binds it (another
process won the race) is retried on a new port; a port the caller chose is not."""
import socket

import pytest

from helpers import REPO
from megatron_opd.platform import net
from megatron_opd.wire.process import start_server

MODEL = REPO / "assets" / "tiny" / "teachers" / "arithmetic"


def test_a_picked_port_taken_before_the_server_binds_it_is_retried(monkeypatch):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    picks = iter([busy, net.free_port()])
    monkeypatch.setattr(net, "free_port", lambda *a, **k: next(picks))  # the first pick loses the race
    try:
        server = start_server(MODEL, role="teacher", timeout=120)
        assert not server.url.endswith(f":{busy}")  # healthy (start_server returned) on the second pick
        server.stop()
        with pytest.raises(RuntimeError, match="address already in use"):
            start_server(MODEL, role="teacher", port=busy, timeout=120)  # the caller's own port: no retry
    finally:
        taken.close()

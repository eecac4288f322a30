"""Sockets: a free loopback port, and whether a host name is loopback only (no torch: the CLI uses
these before any worker starts)."""

from __future__ import annotations

import ipaddress
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(host: str) -> bool:
    """True when every address ``host`` resolves to is a loopback one (False if it does not resolve)."""
    try:
        return all(ipaddress.ip_address(info[4][0]).is_loopback for info in socket.getaddrinfo(host, None))
    except (OSError, ValueError):
        return False

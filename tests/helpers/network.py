"""Addresses of this machine for tests that need a peer that is not on loopback."""

from __future__ import annotations

import socket

import pytest


def non_loopback_address() -> str:
    """An IPv4 address of this machine that is not loopback (peers dialing it are not local)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
        address = str(s.getsockname()[0])
    if address.startswith("127."):
        pytest.fail("this machine has no non-loopback IPv4 address to test remote peers with")
    return address

"""Loopback ports for a local process group that no other process can take in the meantime.

A port that is merely free when chosen (``bind(0)``, read the number, close) can be bound by
any other process before rank 0 binds it, or handed out as the local port of someone's
outgoing connection: on a busy CI machine rank 0 then fails with "address already in use".
:func:`reserved_port` keeps the port bound (``SO_REUSEADDR``, never listening) while the block
runs. Until then the kernel gives it to no ``bind(0)`` and no outgoing connection, and a plain
``bind`` of it fails; the store of rank 0 (``TCPStore`` sets ``SO_REUSEADDR`` too) still binds
and listens on it.
"""

from __future__ import annotations

import socket
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def reserved_port(host: str = "127.0.0.1") -> Iterator[int]:
    """A TCP port on ``host`` that stays reserved for this process's children while the block runs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        yield s.getsockname()[1]


def listening(port: int) -> bool:
    """Whether a TCP socket of this machine listens on ``port`` (any address, IPv4 or IPv6): the
    kernel's socket tables (Linux ``/proc/net/tcp*``), so that watching makes no connection."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as f:
                rows = [line.split() for line in f.readlines()[1:]]
        except FileNotFoundError:
            continue
        if any(row[3] == "0A" and int(row[1].rsplit(":", 1)[1], 16) == port for row in rows):  # 0A: LISTEN
            return True
    return False

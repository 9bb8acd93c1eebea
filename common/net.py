"""A free TCP port on this host."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A free TCP port on this host (rendezvous of the learner ranks or the weight-sync group)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]

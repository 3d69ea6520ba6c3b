"""A free TCP port on 127.0.0.1, for the tools that start their own ranks (the demo, the bench, the GPU checks)."""

import socket


def free_port() -> int:
    """A port no process listens on now (the OS picks it); the ranks' rendezvous binds it right after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]

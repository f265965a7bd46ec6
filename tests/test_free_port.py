"""free_port: servers' ports come from outside the range outgoing connections draw from."""

from __future__ import annotations

import socket

from pupyl_queue import stack


def test_ports_are_below_the_ephemeral_range_bindable_and_never_repeated() -> None:
    low, high = stack._ephemeral_range()
    ports = [stack.free_port() for _ in range(50)]
    assert len(set(ports)) == len(ports)
    for port in ports:
        assert not low <= port <= high, f"{port} is in the ephemeral range {low}-{high}"
        assert port >= stack.LOWEST_PICKED_PORT
    with socket.socket() as sock:  # free now: a server can bind it
        sock.bind(("127.0.0.1", ports[-1]))


def test_a_port_in_use_is_never_returned() -> None:
    low, _ = stack._ephemeral_range()
    held = []
    try:
        for port in range(stack.LOWEST_PICKED_PORT, min(low, stack.LOWEST_PICKED_PORT + 2000)):
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
        taken = {sock.getsockname()[1] for sock in held}
        picked = [stack.free_port() for _ in range(30)]
        assert not taken & set(picked)
    finally:
        for sock in held:
            sock.close()

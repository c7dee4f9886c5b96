"""Where a process runs on the cluster, and what it can offer the processes of other nodes.

On a cluster the driver (the job, on a CPU-only head) is not where the learner ranks or
the engines live, so anything one role sets up for another - a rendezvous address, a
free port - is read on the node where it will be used, through these helpers, called
inside that role's actor.
"""

from __future__ import annotations

import os
import socket
from typing import Any


class LearnerLost(RuntimeError):
    """A learner rank or the reference died (e.g. its node was lost); the group cannot go on as it is."""


def free_ports(count: int = 1) -> list[int]:
    """``count`` distinct TCP ports free on THIS node (all held until all are picked)."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket()
            sock.bind(("", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def this_node() -> dict[str, Any]:
    """The Ray node this process runs on: its address, node id and host name (for the run's nodes.json)."""
    import ray

    return {
        "ip": ray.util.get_node_ip_address(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }

"""Where the run's roles go: what they ask the cluster for, and what a node offers the others.

``resource_needs`` sums what every actor asks Ray for; ``check_resources`` refuses in seconds a run
the cluster can never fit. On a cluster the driver (the job, on a CPU-only head) is not where the learner ranks or
the engines live, so anything one role sets up for another - a rendezvous address, a
free port - is read on the node where it will be used, through these helpers, called
inside that role's actor.
"""

from __future__ import annotations

import math
import os
import socket
from typing import Any, Optional

from score_ray.config import Config


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


def kill_actors(actors) -> None:
    """Kill each actor; one already gone (with its node, or killed before) is passed over."""
    import ray

    for actor in actors:
        try:
            ray.kill(actor)
        except Exception:  # noqa: BLE001 - an actor already gone with its node
            pass


def port_on_this_node(configured: int, key: str) -> int:
    """``configured`` if it is free on this node, or any free port when it is 0; a taken one is named."""
    import ray

    if not configured:
        return free_ports(1)[0]
    with socket.socket() as probe:
        try:
            probe.bind(("", configured))
        except OSError as err:
            raise RuntimeError(f"{key}={configured} is taken on learner rank 0's node "
                               f"{ray.util.get_node_ip_address()} ({err.strerror}); pick another port or 0 (any)") from err
    return configured


def this_node() -> dict[str, Any]:
    """The Ray node this process runs on: its address, node id, host name and the collectives' environment
    (NCCL_* / GLOO_*: which interface they bind), for the run's nodes.json."""
    import ray

    return {
        "ip": ray.util.get_node_ip_address(),
        "node_id": ray.get_runtime_context().get_node_id(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "collectives_env": {name: value for name, value in sorted(os.environ.items())
                            if name.startswith(("NCCL_", "GLOO_"))},
    }


def actor_runtime_env(config: Config) -> Optional[dict[str, Any]]:
    """The runtime_env every actor of the run starts with: cluster.env_vars (set before any library reads them,
    and inherited by the processes an actor starts, e.g. vLLM's engine core)."""
    return {"env_vars": dict(config.cluster.env_vars)} if config.cluster.env_vars else None


def ray_init(config: Config) -> None:
    import ray

    address = config.cluster.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address)  # inside `ray job submit` plain init joins the job's cluster
        return
    needed = resource_needs(config)["CPU"]
    # Logical CPUs: actors take fractional shares of what a small machine really has. address="local":
    # a cluster of our own, even when another local Ray (e.g. from `ray start`) is running on this machine.
    ray.init(address="local", num_cpus=max(int(math.ceil(needed)), os.cpu_count() or 1), include_dashboard=False,
             log_to_driver=False)


def reference_gpus(config: Config) -> float:
    share = config.learner.reference_gpus
    return config.learner.gpus_per_rank if share is None else share


def reference_actors(config: Config) -> int:
    """1, or 0 when the learner ranks serve the reference (learner.share_trunk, trainable=lora)."""
    return 0 if config.learner.serves_reference else 1


def resource_needs(config: Config) -> dict[str, float]:
    """What the run's actors ask Ray for, summed."""
    rollout, learner = config.rollout, config.learner
    needs = {
        "GPU": rollout.num_generators * rollout.gpus_per_generator + learner.num_ranks * learner.gpus_per_rank
        + reference_actors(config) * reference_gpus(config),
        "CPU": rollout.num_generators * rollout.cpus_per_generator
        + (learner.num_ranks + reference_actors(config)) * learner.cpus_per_rank
        + config.reward.workers * config.reward.cpus_per_worker,
    }
    for name, amount in rollout.resources.items():
        needs[name] = needs.get(name, 0.0) + rollout.num_generators * amount
    for name, amount in learner.resources.items():  # the ranks and the reference
        needs[name] = needs.get(name, 0.0) + (learner.num_ranks + reference_actors(config)) * amount
    return needs


def check_resources(config: Config) -> None:
    """Fail in seconds, naming the keys, when the cluster can never fit the run (no autoscaler pending)."""
    import ray

    total = ray.cluster_resources()
    needs = resource_needs(config)
    if os.environ.get("SCORE_RAY_AUTOSCALING"):
        return
    if needs["GPU"] > total.get("GPU", 0.0):
        raise RuntimeError(
            f"this run needs {needs['GPU']:g} GPUs (rollout.num_generators x rollout.gpus_per_generator + "
            f"learner.num_ranks x learner.gpus_per_rank + learner.reference_gpus unless learner.share_trunk) but the "
            f"cluster has "
            f"{total.get('GPU', 0.0):g}; "
            "on an autoscaling cluster set SCORE_RAY_AUTOSCALING=1 to wait for nodes instead"
        )
    if needs["CPU"] > total.get("CPU", 0.0):
        raise RuntimeError(
            f"this run needs {needs['CPU']:g} CPUs (rollout.num_generators x rollout.cpus_per_generator + "
            f"(learner.num_ranks + the reference unless learner.share_trunk) x learner.cpus_per_rank + reward.workers x "
            f"reward.cpus_per_worker) but the "
            f"cluster has {total.get('CPU', 0.0):g}; lower those keys or add nodes (SCORE_RAY_AUTOSCALING=1 waits)"
        )
    for name in sorted(set(needs) - {"CPU", "GPU"}):
        if needs[name] > total.get(name, 0.0):
            raise RuntimeError(
                f"this run needs {needs[name]:g} of the custom resource {name!r} (rollout.resources x generators + "
                f"learner.resources x (ranks + reference)) but the cluster offers {total.get(name, 0.0):g}; start "
                "nodes with it (ray start --resources) or change those keys"
            )

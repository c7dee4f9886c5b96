"""score_ray.placement without a cluster: what a run asks Ray for, and free ports."""

import pytest

from score_ray.config import load_config
from score_ray.placement import free_ports, reference_gpus, resource_needs


def test_resource_needs_sum_every_actor_by_hand():
    config = load_config("smoke", ["rollout.num_generators=2", "rollout.gpus_per_generator=1",
                                   "rollout.cpus_per_generator=1.5", "learner.num_ranks=4", "learner.gpus_per_rank=0.8",
                                   "learner.cpus_per_rank=2", "learner.reference_gpus=0.2", "reward.workers=3",
                                   "reward.cpus_per_worker=0.5", "rollout.resources={engine_node: 1}",
                                   "learner.resources={trainer_node: 0.5}"])
    needs = resource_needs(config)
    assert needs["GPU"] == 2 * 1 + 4 * 0.8 + 0.2
    assert needs["CPU"] == 2 * 1.5 + (4 + 1) * 2 + 3 * 0.5  # the reference takes a rank's CPUs
    assert needs["engine_node"] == 2 and needs["trainer_node"] == 5 * 0.5  # ranks and the reference
    assert reference_gpus(load_config("smoke", ["learner.gpus_per_rank=1"])) == 1  # default: a rank's share


def test_a_shared_trunk_places_no_reference_and_zero3_keeps_the_actor():
    top = ["learner.trainable=top_layers", "learner.num_ranks=1", "learner.cpus_per_rank=2", "learner.gpus_per_rank=1",
           "learner.resources={trainer_node: 1}", "rollout.cpus_per_generator=2", "rollout.gpus_per_generator=1",
           "reward.workers=1", "reward.cpus_per_worker=0.25"]
    shared = resource_needs(load_config("smoke", top))
    assert shared["CPU"] == 2 + 1 * 2 + 0.25 and shared["GPU"] == 1 + 1 and shared["trainer_node"] == 1
    separate = resource_needs(load_config("smoke", top + ["learner.share_trunk=false"]))
    assert separate["CPU"] == 2 + 2 * 2 + 0.25 and separate["GPU"] == 1 + 1 + 1 and separate["trainer_node"] == 2
    assert not load_config("smoke", top + ["learner.zero_stage=3"]).learner.shares_trunk  # partitioned trunk
    assert not load_config("smoke", ["learner.trainable=all"]).learner.shares_trunk  # nothing frozen to share


def test_free_ports_are_distinct_and_bindable():
    import socket

    ports = free_ports(5)
    assert len(set(ports)) == 5
    for port in ports:
        with socket.socket() as sock:
            sock.bind(("", port))


def test_a_configured_port_is_used_when_free_and_named_when_taken():
    import socket

    from score_ray.placement import port_on_this_node

    port = free_ports(1)[0]
    assert port_on_this_node(port, "learner.rendezvous_port") == port
    assert port_on_this_node(0, "learner.rendezvous_port") > 0  # 0: any free port
    with socket.socket() as taken:
        taken.bind(("", port))
        taken.listen()
        with pytest.raises(RuntimeError, match=f"learner.transfer_port={port} is taken on learner rank 0's node"):
            port_on_this_node(port, "learner.transfer_port")


def test_cluster_env_vars_become_every_actors_runtime_env():
    from score_ray.placement import actor_runtime_env

    assert actor_runtime_env(load_config("smoke")) is None
    config = load_config("smoke", ["cluster.env_vars={NCCL_SOCKET_IFNAME: eth0}"])
    assert actor_runtime_env(config) == {"env_vars": {"NCCL_SOCKET_IFNAME": "eth0"}}

"""learner.share_trunk: two ZeRO-2 ranks serve the reference from the frozen trunk they share with the policy."""

import numpy as np
import pytest

from score_ray.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def group_and_reference(ray_local):
    import ray

    from score_ray.assets import model_folder
    from score_ray.learner import LearnerGroup
    from score_ray.reference import ReferenceActor

    config = load_config("smoke", ["learner.trainable=top_layers", "learner.trainable_top_layers=1",
                                   "learner.lr=1e-3", "rollout.temperature=0.7"])
    assert config.learner.shares_trunk and config.learner.num_ranks == 2
    model_folder(config.model)
    reference = ReferenceActor.options(num_cpus=0.5).remote(config.model, 0.5)
    group = LearnerGroup(config.model, config.learner, config.algo, 0, 120)
    ray.get(reference.ready.remote())
    yield config, group, reference
    group.shutdown()
    ray.kill(reference)


def sequences_and_selects(count=6, seed=0):
    rng = np.random.default_rng(seed)
    sequences = [rng.integers(3, 200, size=int(rng.integers(12, 40))).tolist() for _ in range(count)]
    selects = [[0.0] * 5 + [1.0] * (len(s) - 6) for s in sequences]
    return sequences, selects


def turn_temperatures(sequences):
    """Two "turns" per sequence: positions before 9 sampled at 1.3, the rest at 0.7 (rollout.temperature_turn1)."""
    return [[1.3] * 9 + [0.7] * (len(s) - 10) for s in sequences]


def samples_for(sequences, selects, refs):
    from score_ray.samples import LearnerSample

    return [LearnerSample(input_ids=s, loss_mask=m, advantage=[1.0] * len(m), kl_coef=[0.1] * len(m),
                          old_logp=r, ref_logp=r, temperature=t)
            for s, m, r, t in zip(sequences, selects, refs, turn_temperatures(sequences))]


def test_the_ranks_reference_log_probs_are_the_reference_actors_before_and_after_the_policy_moves(group_and_reference):
    import ray

    config, group, reference = group_and_reference
    sequences, selects = sequences_and_selects()
    temperatures = turn_temperatures(sequences)
    expected = ray.get(reference.sequence_logprobs.remote(sequences, selects, temperatures))
    # each position at its own temperature: not the log-probs of one temperature throughout
    assert not np.allclose(expected[0], ray.get(reference.sequence_logprobs.remote(sequences, selects, 0.7))[0],
                           atol=1e-3)
    for _ in range(2):
        reference = group.reference_logprobs(sequences, selects, temperatures)
        shared, seconds = reference.logps, reference.compute_seconds
        assert seconds > 0
        for got, want in zip(shared, expected):
            assert np.allclose(got, want, atol=1e-5)
        stats = group.train_step(samples_for(sequences, selects, shared), trunk_rows=reference.trunk_rows)
        assert stats.applied and stats.trunk_batches == stats.filled_batches > 0
    # The policy moved away from the reference, so the comparison above could fail.
    policy = group.sequence_logprobs(sequences, temperatures)
    start = 5
    assert max(abs(a - b) for a, b in zip(policy[0][start:], expected[0][start:])) > 1e-2


def test_a_step_on_the_kept_trunk_is_the_step_of_the_whole_model(group_and_reference, tmp_path):
    config, group, reference = group_and_reference
    sequences, selects = sequences_and_selects(seed=1)
    group.save_checkpoint(str(tmp_path), "start")
    reference = group.reference_logprobs(sequences, selects, turn_temperatures(sequences))
    refs = reference.logps
    on_trunk = group.train_step(samples_for(sequences, selects, refs), trunk_rows=reference.trunk_rows)
    assert on_trunk.trunk_batches == on_trunk.filled_batches > 0  # every micro-batch found its trunk
    group.load_checkpoint(str(tmp_path), "start")
    # the reload dropped what the ranks kept: the same hand-off now runs the whole forward
    whole = group.train_step(samples_for(sequences, selects, refs), trunk_rows=reference.trunk_rows)
    assert whole.trunk_batches == 0
    assert on_trunk.grad_norm == pytest.approx(whole.grad_norm, rel=1e-5)
    assert on_trunk.loss == pytest.approx(whole.loss, rel=1e-6)
    assert on_trunk.kl == pytest.approx(whole.kl, rel=1e-5, abs=1e-9)

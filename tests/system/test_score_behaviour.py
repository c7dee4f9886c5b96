"""SCoRe's effect, held by a test: a short run on the model organism (docs/organism.md) must teach the second
attempt to correct the first, through the whole stack (Ray, vLLM, DeepSpeed, the sandboxed grader).

The organism's base breaks more answers than it fixes on a second attempt (Delta about -13 points); a short
SCoRe run must turn that around without buying it with a worse first attempt. The test fails when the
algorithm is broken by hand in any of these ways (each tried once; docs/organism.md lists the numbers):
the KL's sign flipped, turn 2's advantage put on turn 1's tokens, the shaping bonus's sign flipped, the weight
sync to the generator skipped.
"""

import json

import pytest

from conftest import run_module

pytestmark = pytest.mark.slow

# configs/organism.yaml's recipe as it is. The held-out split is for the study's numbers: the run's own eval is cut to one problem, and base and trained
# model are compared on the same 600 training-split problems drawn with another seed than the run's (a few
# may have been trained on: the behaviour under test is a policy of the second attempt, not an answer), so
# every comparison is paired per problem.
RECIPE = ["--config", "organism", "eval.at_start=false", "eval.every=0", "eval.max_problems=1", "checkpoint.every=0",
          "logging.wandb=disabled", "run.name=behaviour"]
COMPARED = ["--config", "organism", "--on-train", "--n", "600", "data.train.seed=1"]


def evaluate(model: str, records) -> dict:
    from score_ray.study.report import read_records

    result = run_module("score_ray.eval", model, *COMPARED, "--records", str(records), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return read_records(records)


def test_a_short_score_run_teaches_the_organism_to_correct_itself(tmp_path):
    from score_ray.study.stats import estimate, gain

    result = run_module("score_ray.launch", *RECIPE, f"run.output_dir={tmp_path}", timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    (run_dir,) = list(tmp_path.glob("behaviour-*"))
    base = [evaluate("organism", tmp_path / "base.jsonl")]
    trained = [evaluate(str(run_dir / "final_model"), tmp_path / "trained.jsonl")]
    problems = sorted(base[0])
    assert len(problems) == 600 and sorted(trained[0]) == problems
    numbers = {key: gain(trained, base, problems, f"eval/{key}") for key in ("delta", "acc_t1")}
    numbers.update({f"trained_{key}": estimate(trained, problems, f"eval/{key}") for key in ("delta", "delta_i2c", "delta_c2i")})
    numbers["base_delta"] = estimate(base, problems, "eval/delta")
    print(json.dumps(numbers, indent=1))
    # the second attempt now corrects: Delta above the base's by more than 3 standard errors (paired) ...
    assert numbers["delta"]["mean"] > 3 * numbers["delta"]["se"], numbers
    # ... by fixing wrong first answers more often than it breaks right ones, so that it beats copying the first
    # answer (Delta 0, and a gain over the base of 13 points: the gain alone cannot tell correcting from copying) ...
    assert numbers["trained_delta_i2c"]["mean"] > numbers["trained_delta_c2i"]["mean"], numbers
    assert numbers["trained_delta"]["mean"] > 3 * numbers["trained_delta"]["se"], numbers
    # ... and not by a worse first attempt (deferring): Acc@t1 within 2 standard errors of the base's, or above
    assert numbers["acc_t1"]["mean"] > -2 * numbers["acc_t1"]["se"], numbers
    # The generator learned it too, through the weight syncs: its sampled second attempts of the last iterations
    # break right answers less than half as often as those of the first (the base's break about three times as
    # many as they fix; a generator left on the base's weights would go on breaking as many).
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    sampled = [row for row in rows if "train/c2i" in row]
    broken_first = sum(row["train/c2i"] for row in sampled[:5]) / 5
    broken_last = sum(row["train/c2i"] for row in sampled[-5:]) / 5
    print({"sampled c2i, first 5 iterations": broken_first, "last 5": broken_last})
    assert broken_last < broken_first / 2, (broken_first, broken_last)

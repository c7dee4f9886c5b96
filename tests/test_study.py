"""score_ray.study without running anything: the statistics by hand, the study file's checks, the report."""

import json
import math

import pytest

from score_ray.study.stats import change_estimates, common_problems, estimate, gain


def test_a_methods_mean_and_error_count_both_problems_and_seeds_by_hand():
    # two seeds, four problems; Delta per problem: seed 0 (+1, 0, 0, -1), seed 1 (+1, +1, 0, 0)
    seed0 = {"a": (0.0, 1.0), "b": (1.0, 1.0), "c": (0.0, 0.0), "d": (1.0, 0.0)}
    seed1 = {"a": (0.0, 1.0), "b": (0.0, 1.0), "c": (0.0, 0.0), "d": (1.0, 1.0)}
    problems = common_problems([seed0, seed1])
    delta = estimate([seed0, seed1], problems, "eval/delta")
    # per problem over seeds: 1, 0.5, 0, -0.5 -> mean 0.25, sample variance 0.41667; seed means 0 and 0.5
    assert delta["mean"] == pytest.approx(0.25)
    assert delta["se"] == pytest.approx(math.sqrt((1.25 / 3) / 4 + 0.125 / 2))
    i2c = estimate([seed0, seed1], problems, "eval/delta_i2c")
    assert i2c["mean"] == pytest.approx((1 / 4 + 2 / 4) / 2)
    one_seed = estimate([seed0], problems, "eval/acc_t1")  # one seed: the problems' error alone
    assert one_seed == pytest.approx({"mean": 0.5, "se": math.sqrt((1 / 3) / 4)})


def test_a_gain_is_paired_per_problem():
    treated = [{"a": (1.0, 1.0), "b": (0.0, 1.0), "c": (1.0, 1.0)}]
    control = [{"a": (1.0, 1.0), "b": (0.0, 0.0), "c": (1.0, 0.0)}]
    # Acc@t2 per problem: treated 1, 1, 1; control 1, 0, 0 -> differences 0, 1, 1
    result = gain(treated, control, ["a", "b", "c"], "eval/acc_t2")
    assert result["mean"] == pytest.approx(2 / 3)
    assert result["se"] == pytest.approx(math.sqrt((1 / 3) / 3))
    assert common_problems([treated[0], {"a": (0, 0), "c": (0, 0)}]) == ["a", "c"]  # only what both evaluated


def test_the_change_rate_and_its_precision_by_hand():
    # two seeds, four problems; seed 0 changes a (wrong first), b (right first); seed 1 changes a, c (both wrong first)
    rewards = [{"a": (0.0, 1.0), "b": (1.0, 0.0), "c": (0.0, 0.0), "d": (1.0, 1.0)},
               {"a": (0.0, 1.0), "b": (1.0, 1.0), "c": (0.0, 1.0), "d": (1.0, 1.0)}]
    changes = [{"a": True, "b": True, "c": False, "d": False}, {"a": True, "b": False, "c": True, "d": False}]
    out = change_estimates(rewards, changes, ["a", "b", "c", "d"])
    assert out["eval/changed"]["mean"] == pytest.approx(0.5)
    # per problem over seeds: changed b = (1, .5, .5, 0), wrong-and-changed a = (1, 0, .5, 0) -> R = 1.5 / 2
    ratio = 0.75
    residuals = [1 - ratio * 1, 0 - ratio * 0.5, 0.5 - ratio * 0.5, 0.0]
    mean = sum(residuals) / 4
    problem_term = sum((r - mean) ** 2 for r in residuals) / 3 / (4 * 0.5 ** 2)
    seed_term = ((0.5 - 0.75) ** 2 + (1.0 - 0.75) ** 2) / 1 / 2  # the seeds' own ratios: 1/2 and 2/2
    assert out["eval/change_precision"]["mean"] == pytest.approx(ratio)
    assert out["eval/change_precision"]["se"] == pytest.approx(math.sqrt(problem_term + seed_term))
    # a method that never changes an answer has a change rate of 0 and no precision
    never = change_estimates(rewards, [dict.fromkeys("abcd", False)] * 2, ["a", "b", "c", "d"])
    assert never["eval/changed"]["mean"] == 0.0 and "eval/change_precision" not in never


def test_the_study_file_is_checked_and_every_method_keeps_the_same_held_out_set(tmp_path):
    from score_ray.study import load_study

    good = tmp_path / "study.yaml"
    good.write_text("name: s\nconfig: smoke\nmethods:\n  base: {train: false}\n  score: {seeds: [0, 1]}\n")
    spec = load_study(good)
    assert spec.methods["score"].seeds == [0, 1] and not spec.methods["base"].train
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: s\nconfig: smoke\nmethods:\n  score: {seeds: [0], overides: []}\n")
    with pytest.raises(SystemExit, match="overides"):
        load_study(bad)
    bad.write_text("name: s\nconfig: smoke\nmethods:\n  score: {overrides: [data.eval.count=5]}\n")
    with pytest.raises(SystemExit, match="the study's held-out problems"):
        load_study(bad)


def test_the_report_writes_the_table_plot_and_summary_of_the_finished_runs(tmp_path):
    from score_ray.study import load_study
    from score_ray.study.report import write_report

    study = tmp_path / "study.yaml"
    study.write_text(f"name: s\nconfig: smoke\nresults_dir: {tmp_path / 'results'}\n"
                     "methods:\n  base: {train: false}\n  score: {seeds: [0, 1]}\n  star: {seeds: [0]}\n")
    spec = load_study(study)
    outcomes = {("base", 0): [(1, 0), (0, 0), (1, 1)], ("score", 0): [(1, 1), (0, 1), (1, 1)],
                ("score", 1): [(1, 1), (0, 0), (1, 1)]}  # star seed 0 never finished
    for (method, seed), rewards in outcomes.items():
        folder = tmp_path / "results" / "s" / method / f"seed-{seed}"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text("{}")
        (folder / "eval_final.jsonl").write_text("".join(
            json.dumps({"id": f"p{i}", "r1": a, "r2": b, "changed": a != b}) + "\n" for i, (a, b) in enumerate(rewards)))
        (folder / "metrics.jsonl").write_text(json.dumps({"iteration": 2, "eval/acc_t1": 0.5, "eval/acc_t2": 0.6}) + "\n")
    summary = write_report(spec)
    out = tmp_path / "results" / "s"
    assert json.loads((out / "summary.json").read_text()) == summary
    assert summary["n_problems"] == 3 and set(summary["methods"]) == {"base", "score"}
    assert summary["methods"]["score"]["seeds"] == [0, 1]
    assert set(summary["methods"]["score"]) == {"seeds", "eval/acc_t1", "eval/acc_t2", "eval/delta", "eval/delta_i2c",
                                                "eval/delta_c2i", "eval/changed", "eval/change_precision"}
    # base changed only p0, whose first answer was right: precision 0
    assert summary["methods"]["base"]["eval/change_precision"]["mean"] == 0.0
    # Delta: base (-1, 0, 0) -> -1/3; score (0, +1, 0) and (0, 0, 0) -> 1/6; the gain 1/2
    assert summary["methods"]["base"]["eval/delta"]["mean"] == pytest.approx(-1 / 3)
    assert summary["gain"]["eval/delta"]["mean"] == pytest.approx(1 / 6 + 1 / 3)
    text = (out / "table.md").read_text()
    assert "| score | 2 |" in text and "gain: score - base" in text and "of 3 held-out problems" in text
    assert "| precision of changes |" in text and "| base | 1 | 66.7 +- 33.3 | 33.3 +- 33.3 " in text
    assert (out / "plot.png").stat().st_size > 10_000


def test_a_report_regraded_with_cut_responses_wrong_takes_reward_only_from_them(tmp_path):
    from score_ray.study.report import read_records

    rows = [{"id": "whole", "r1": 1.0, "r2": 0.0, "truncated1": False, "truncated2": False},
            {"id": "cut_first", "r1": 1.0, "r2": 1.0, "truncated1": True, "truncated2": False},  # read from a fragment
            {"id": "cut_both", "r1": 0.0, "r2": 1.0, "truncated1": True, "truncated2": True}]
    path = tmp_path / "eval_final.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert read_records(path) == {"whole": (1.0, 0.0), "cut_first": (1.0, 1.0), "cut_both": (0.0, 1.0)}
    assert read_records(path, truncated_wrong=True) == {"whole": (1.0, 0.0), "cut_first": (0.0, 1.0),
                                                        "cut_both": (0.0, 0.0)}
    # records written before truncation was recorded cannot be re-graded: said, not guessed
    path.write_text(json.dumps({"id": "old", "r1": 1.0, "r2": 1.0}) + "\n")
    with pytest.raises(ValueError, match="'old' has no truncated1"):
        read_records(path, truncated_wrong=True)


def test_every_shipped_study_and_each_of_its_methods_validates():
    from pathlib import Path

    from score_ray.config import load_config
    from score_ray.study import load_study

    studies = sorted((Path(__file__).resolve().parent.parent / "configs" / "studies").glob("*.yaml"))
    assert studies
    for path in studies:
        spec = load_study(path)
        assert spec.control in spec.methods and spec.treated in spec.methods, path
        for method in spec.methods.values():
            load_config(spec.config, spec.overrides + method.overrides)


def test_a_study_runs_seed_major_so_a_cut_short_one_is_balanced():
    from score_ray.study import StudySpec, study_order

    spec = StudySpec(name="s", config="smoke", methods={"base": {"train": False}, "score": {"seeds": [0, 1, 2]},
                                                         "single_turn": {"seeds": [0, 1, 2]}, "star": {}})
    assert study_order(spec) == [("base", 0), ("score", 0), ("single_turn", 0), ("star", 0),
                                 ("score", 1), ("single_turn", 1), ("score", 2), ("single_turn", 2)]
    assert study_order(spec, only=["score"]) == [("score", 0), ("score", 1), ("score", 2)]


def test_the_demo_is_the_cpu_studys_score_recipe_at_one_seed():
    # `make demo` promises one seed of the study's recipe: the two may differ only in when they evaluate
    # and checkpoint, never in data, model, rollout, grader or algorithm.
    from pathlib import Path

    from score_ray.config import load_config
    from score_ray.study import load_study

    spec = load_study(Path(__file__).resolve().parent.parent / "configs" / "studies" / "cpu_study_closed.yaml")
    demo = load_config(None).model_dump(mode="json")
    study = load_config(spec.config, spec.overrides + spec.methods["score"].overrides).model_dump(mode="json")
    assert spec.config.endswith("cpu_demo.yaml")
    differing = {(section, key) for section in demo for key in demo[section]
                 if demo[section][key] != study[section][key]}
    assert differing == {("eval", "at_start"), ("eval", "every"), ("checkpoint", "every")}
    assert demo["algo"]["normalize_advantages"] and not demo["reward"]["credit_truncated"]
    assert demo["data"]["eval"]["count"] >= 500


def _differences(stored, now, path=()):
    if not isinstance(stored, dict):
        return [] if stored == now else [(".".join(path), stored, now)]
    if not isinstance(now, dict):
        return [(".".join(path), stored, now)]
    return [found for key, value in stored.items()
            for found in _differences(value, now.get(key, "<no such key>"), path + (key,))]


def test_every_committed_study_run_is_what_its_study_file_asks_for_today():
    # The demo's config is the root of every CPU study: a change to it must not silently change what an
    # earlier study's file means (cpu_study pins normalize_advantages=false, which the demo later turned on).
    # Keys a stored config lacks (added to the schema since) are the studies' business, not compared here.
    from pathlib import Path

    import yaml

    from score_ray.config import load_config
    from score_ray.study import load_study

    root = Path(__file__).resolve().parent.parent
    stored_configs = sorted(root.glob("results/*/*/seed-*/config.yaml"))
    assert len(stored_configs) >= 20
    for stored_path in stored_configs:
        study, method, seed_folder = stored_path.relative_to(root / "results").parts[:3]
        seed = int(seed_folder.removeprefix("seed-"))
        spec = load_study(root / "configs" / "studies" / f"{study}.yaml")
        overrides = spec.overrides + spec.methods[method].overrides + [
            f"run.name={spec.name}-{method}-s{seed}", f"run.seed={seed}", f"run.output_dir={spec.runs_dir}",
            "run.resume=true"]
        now = load_config(str(root / spec.config), overrides).model_dump(mode="json")
        assert _differences(yaml.safe_load(stored_path.read_text()), now) == [], stored_path


def test_a_study_can_start_from_another_and_add_overrides_and_methods(tmp_path):
    import pytest

    from score_ray.study import load_study

    (tmp_path / "parent.yaml").write_text(
        "name: parent\nconfig: smoke\noverrides: [eval.every=0]\n"
        "methods: {base: {train: false}, score: {seeds: [0, 1]}, star: {overrides: ['algo.objective=star']}}\n")
    (tmp_path / "child.yaml").write_text(
        "base: parent.yaml\nname: child\noverrides: [algo.normalize_advantages=true]\nmethods: {score: {seeds: [5]}}\n")
    child = load_study(tmp_path / "child.yaml")
    assert child.name == "child" and child.config == "smoke"
    assert child.overrides == ["eval.every=0", "algo.normalize_advantages=true"]  # the child's win, coming last
    assert list(child.methods) == ["base", "score", "star"]
    assert child.methods["score"].seeds == [5] and child.methods["star"].overrides == ["algo.objective=star"]
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\nname: loop\n")
    with pytest.raises(SystemExit, match="loops back"):
        load_study(tmp_path / "loop.yaml")
    (tmp_path / "orphan.yaml").write_text("base: missing.yaml\nname: orphan\n")
    with pytest.raises(SystemExit, match="'missing.yaml' not found"):
        load_study(tmp_path / "orphan.yaml")


def test_training_curves_average_each_iteration_over_the_seeds_that_logged_it(tmp_path):
    import json

    from score_ray.study.report import metric_curves

    rows = {0: [{"iteration": 1, "train/reward_t2": 0.25}, {"iteration": 2, "train/reward_t2": 0.5},
                {"iteration": 2, "eval/acc_t2": 0.4}],
            1: [{"iteration": 1, "train/reward_t2": 0.75}]}  # seed 1 stopped after iteration 1
    folders = {}
    for seed, logged in rows.items():
        folders[seed] = tmp_path / f"seed-{seed}"
        folders[seed].mkdir()
        (folders[seed] / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in logged))
    curves = metric_curves({"score": folders, "base": {0: tmp_path / "nothing"}},
                           ("train/reward_t2", "eval/acc_t2", "train/truncated_t1"))
    assert curves == {"score": {"train/reward_t2": [(1, 0.5), (2, 0.5)], "eval/acc_t2": [(2, 0.4)]}}


def test_the_gain_is_split_by_whether_the_controls_first_attempt_ran_to_the_cap(tmp_path):
    from score_ray.study import load_study
    from score_ray.study.report import read_cut_first_attempts, write_report

    study = tmp_path / "study.yaml"
    study.write_text(f"name: s\nconfig: smoke\nresults_dir: {tmp_path / 'results'}\n"
                     "methods:\n  base: {train: false}\n  score: {seeds: [0]}\n")
    spec = load_study(study)
    # base cuts p0 and p1 at the cap (both wrong) and finishes p2 (wrong) and p3 (right); score gets p0, p1, p2 right
    rows = {"base": [(0, 0, True), (0, 0, True), (0, 0, False), (1, 1, False)],
            "score": [(1, 1, False), (1, 1, False), (1, 1, False), (1, 1, False)]}
    for method, outcomes in rows.items():
        folder = tmp_path / "results" / "s" / method / "seed-0"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text("{}")
        (folder / "eval_final.jsonl").write_text("".join(
            json.dumps({"id": f"p{i}", "r1": a, "r2": b, "truncated1": cut, "truncated2": cut}) + "\n"
            for i, (a, b, cut) in enumerate(outcomes)))
        (folder / "metrics.jsonl").write_text("")
    assert read_cut_first_attempts(tmp_path / "results" / "s" / "base" / "seed-0" / "eval_final.jsonl") == {"p0", "p1"}
    summary = write_report(spec)
    assert summary["gain"]["eval/acc_t1"]["mean"] == pytest.approx(3 / 4)
    split = summary["gain_split"]
    assert split["cut"]["n"] == 2 and split["cut"]["eval/acc_t1"]["mean"] == pytest.approx(1.0)
    assert split["finished"]["n"] == 2 and split["finished"]["eval/acc_t1"]["mean"] == pytest.approx(1 / 2)
    text = (tmp_path / "results" / "s" / "table.md").read_text()
    assert "| gain where base's first attempt was cut (2) |  | +100.0 +- 0.0 |" in text
    # records from before truncation was recorded give no split rather than a wrong one
    (tmp_path / "results" / "s" / "base" / "seed-0" / "eval_final.jsonl").write_text(
        json.dumps({"id": "p0", "r1": 0, "r2": 0}) + "\n")
    assert "gain_split" not in write_report(spec)

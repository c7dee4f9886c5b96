"""score_ray.batches: the order of training problems over epochs and each problem's sampling seed."""

from score_ray.batches import next_batch, sampling_seeds
from score_ray.data import Problem


def test_data_order_crosses_epochs_without_skipping_or_repeating():
    epoch = position = 0
    seen = []
    for _ in range(7):  # 7 batches of 3 over 10 problems: 2 epochs + 1 problem
        batch, epoch, position = next_batch(epoch, position, 10, 3, seed=1)
        seen += batch
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    assert seen[:10] != seen[10:20]  # each epoch reshuffles
    assert (epoch, position) == (2, 1)
    again, epoch, position = [], 0, 0
    for _ in range(7):
        batch, epoch, position = next_batch(epoch, position, 10, 3, seed=1)
        again.append(batch)
    assert again == [seen[i : i + 3] for i in range(0, 21, 3)]


def test_sampling_seeds_depend_on_seed_iteration_and_problem_only():
    problems = [Problem(id=f"p{i}", kind="math", prompt="1 + 1", answer="2") for i in range(6)]
    seeds = sampling_seeds(0, 3, problems)
    assert seeds == sampling_seeds(0, 3, problems)  # a redone rollout samples the same
    assert len(set(seeds)) == 6 and all(0 <= s < 2**30 for s in seeds)
    assert seeds != sampling_seeds(0, 4, problems) and seeds != sampling_seeds(1, 3, problems)
    # how problems are dealt to generators does not matter: each problem keeps its seed
    assert seeds[1::2] == sampling_seeds(0, 3, problems)[1::2]

"""score_ray.learner without a process group: dealing samples to ranks in token-bounded micro-batches,
and collating them so every per-position field lines up with the log-probs."""

from score_ray.learner import deal_by_trunk, deal_to_ranks, micro_batch_indices
from score_ray.learner_rank import collate, deepspeed_config
from score_ray.samples import POSITION_FIELDS, LearnerSample


def sample(length: int, tag: float = 1.0) -> LearnerSample:
    width = length - 1
    return LearnerSample(input_ids=list(range(1, length + 1)), loss_mask=[1.0] * width, advantage=[tag] * width,
                         kl_coef=[0.0] * width, old_logp=[-0.5] * width, ref_logp=[-0.25] * width,
                         temperature=[0.7] * width)


def test_ranks_get_the_same_number_of_token_bounded_micro_batches_and_every_sample_once():
    samples = [sample(n, float(i)) for i, n in enumerate([40, 10, 30, 20, 25, 5, 8])]
    per_rank = [[[samples[i] for i in batch] for batch in batches]
                for batches in micro_batch_indices([len(s.input_ids) for s in samples], ranks=2, max_tokens=60)]
    assert len(per_rank) == 2 and len(per_rank[0]) == len(per_rank[1])  # ZeRO-3: every rank in every forward
    dealt = [s.advantage[0] for batches in per_rank for batch in batches for s in batch]
    assert sorted(dealt) == [float(i) for i in range(7)]
    for batches in per_rank:
        for batch in batches:  # padded to the longest: width x rows within the budget (a lone long one may pass)
            assert len(batch) <= 1 or max(len(s.input_ids) for s in batch) * len(batch) <= 60
    loads = [sum(len(s.input_ids) for batch in batches for s in batch) for batches in per_rank]
    assert abs(loads[0] - loads[1]) <= 10  # longest first to the least-loaded rank


def test_samples_go_to_the_rank_that_kept_their_trunk_in_its_order():
    lengths = [40, 10, 30, 20, 25]
    kept = deal_to_ranks(lengths, 2)  # the reference pass: row i is sequence i
    # an RL step trains the pass's rows in order: the same deal, so the same micro-batches as dealing anew
    assert deal_by_trunk(kept, range(5)) == kept
    assert micro_batch_indices(lengths, 2, 60, deal_by_trunk(kept, range(5))) == micro_batch_indices(lengths, 2, 60)
    # a baseline trains rows 3 and 1 (its chosen episodes): each to the rank that kept it
    chosen = deal_by_trunk(kept, [3, 1])
    assert sorted(i for share in chosen for i in share) == [0, 1]
    assert all((0 in share) == (3 in rows) and (1 in share) == (1 in rows) for share, rows in zip(chosen, kept))
    # nothing kept (a reload), or a row the pass never had: no hand-off, the whole model runs
    assert deal_by_trunk(None, range(5)) is None and deal_by_trunk(kept, [0, 9]) is None


def test_collate_pads_right_and_aligns_each_field_to_the_position_that_scores_the_next_token():
    ids, attention, fields = collate([sample(4, 2.0), sample(2, 3.0)], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 4], [1, 2, 0, 0]] and attention.tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert set(fields) == set(POSITION_FIELDS)
    assert fields["loss_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]  # padding is never trained
    assert fields["advantage"].tolist() == [[2, 2, 2], [3, 0, 0]]


def test_an_empty_micro_batch_is_one_untrained_row_at_a_finite_temperature():
    # it still joins the forward (ZeRO-3 gathers there), so its logits are divided by its temperature
    ids, attention, fields = collate([], pad_id=7)
    assert ids.tolist() == [[7, 7]] and attention.tolist() == [[1, 1]]
    assert fields["loss_mask"].tolist() == [[0.0]] and fields["temperature"].tolist() == [[1.0]]


def test_gradients_accumulate_in_fp32_under_bf16_weights():
    import torch
    from deepspeed.runtime.config import DtypeEnum

    from score_ray.config import LearnerConfig

    for bf16 in (True, False):
        config = deepspeed_config(LearnerConfig(zero_stage=3), bf16=bf16)
        assert config["bf16"]["enabled"] is bf16 and config["zero_optimization"]["stage"] == 3
        # the value DeepSpeed's engine reads for its ZeRO optimisers' gradient_accumulation_dtype
        assert DtypeEnum(config["data_types"]["grad_accum_dtype"]).value == torch.float32

"""Which decode rows attend on their own (pure arithmetic), and that it changes no logits."""
import torch

from models.attention_plan import ALONE_OVERHEAD_KEYS, MAX_ALONE, AttentionPlan, plan_decode_attention
from tests.models.support import random_model, tiny_config


def test_rows_of_like_lengths_share_one_attention():
    assert plan_decode_attention([100, 120, 90, 130]) == AttentionPlan(130)
    assert plan_decode_attention([7]) == AttentionPlan(7)


def test_one_long_row_among_many_short_ones_attends_alone():
    lengths = [100] * 32
    lengths[5] = 2001
    assert plan_decode_attention(lengths) == AttentionPlan(100, ((5, 2001),))


def test_a_row_is_taken_out_only_when_that_saves_more_than_its_overhead():
    # 4 rows: taking the 600-key row out saves 4 x 500 keys = 2,000, more than 600 + overhead.
    assert plan_decode_attention([100, 600, 100, 100]).alone == ((1, 600),)
    # 2 rows: it would save 2 x 100 keys, less than the overhead of attending alone.
    assert plan_decode_attention([100, 200]) == AttentionPlan(200)
    assert ALONE_OVERHEAD_KEYS > 200


def test_at_most_a_few_rows_attend_alone():
    lengths = [50] * 20 + [3000 + i for i in range(10)]
    plan = plan_decode_attention(lengths)
    assert len(plan.alone) <= MAX_ALONE
    assert plan.shared_keys == max(length for row, length in enumerate(lengths)
                                   if row not in {r for r, _ in plan.alone})


def test_decode_with_rows_alone_gives_the_logits_of_one_shared_attention():
    model = random_model(tiny_config(max_position_embeddings=128), seed=4)
    model.fuse_projections()
    model.setup_cache(3, 128)
    prompts = torch.randint(3, 400, (3, 90), generator=torch.Generator().manual_seed(5))
    lengths = torch.tensor([6, 90, 9])  # row 1 is long
    with torch.inference_mode():
        model.prefill(prompts, torch.tensor([0, 1, 2]), lengths)
        tokens = torch.tensor([11, 12, 13])
        shared = model.decode(tokens, lengths.clone(), 91, ragged=True)
        # The same step again (it rewrites the same cache slots), row 1 alone over its 91 keys.
        split = model.decode(tokens, lengths.clone(), 10, ragged=True, alone=((1, 91),))
    torch.testing.assert_close(split, shared, atol=1e-5, rtol=1e-4)
    # Without row 1's own attention its logits would differ (it would see 10 keys only).
    with torch.inference_mode():
        truncated = model.decode(tokens, lengths.clone(), 10, ragged=True)
    assert not torch.allclose(truncated[1], shared[1], atol=1e-3)

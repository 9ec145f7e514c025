"""Layout equivalence and structure of collated batches (tiny random Llama, fp32, SDPA)."""

from __future__ import annotations

import pytest
import torch
from tiny_llama import tiny_llama

from alignkit.data.batch import TokenizedGroup, sum_per_slot
from alignkit.data.collate import MASK_VALUE, collate

VOCAB = 64
TOLERANCE = 1e-5  # max abs difference of per-target log-probs between layouts (fp32)


@pytest.fixture(scope="module")
def model():
    return tiny_llama(vocab_size=VOCAB).eval()


def _groups() -> list[TokenizedGroup]:
    gen = torch.Generator().manual_seed(1)

    def ids(n: int) -> list[int]:
        return torch.randint(1, VOCAB, (n,), generator=gen).tolist()

    return [
        TokenizedGroup(ids(5), [ids(3), ids(6)], [[True] * 3, [False] + [True] * 5], scores=[1.0, 0.0]),
        TokenizedGroup(ids(2), [ids(4)], [[True, False, True, True]], example_id="b"),  # K=1 < max K
        TokenizedGroup(ids(7), [ids(1), ids(2), ids(5)], [[True], [True, True], [True] * 5]),
    ]


def _target_logps(model, batch) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=batch.position_ids).logits
    flat = torch.log_softmax(logits.float(), -1).view(-1, logits.shape[-1])
    return flat[batch.target_index].gather(1, batch.target_ids[:, None]).squeeze(1)


def _by_slot(batch, values) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for slot, value in zip(batch.target_slot.tolist(), values.tolist()):
        out.setdefault(slot, []).append(value)
    return out


@pytest.mark.parametrize("layout,budget", [("packed", None), ("packed", 20), ("packed", 1000),
                                           ("prefix_shared", None), ("prefix_shared", 16), ("prefix_shared", 1000)])
def test_layouts_give_same_logps_as_padded(model, layout, budget):
    groups = _groups()
    padded = collate(groups, layout="padded", pad_token_id=0)
    other = collate(groups, layout=layout, pad_token_id=0, max_tokens_per_row=budget)
    ref, got = _by_slot(padded, _target_logps(model, padded)), _by_slot(other, _target_logps(model, other))
    assert ref.keys() == got.keys()
    for slot in ref:
        assert torch.allclose(torch.tensor(ref[slot]), torch.tensor(got[slot]), atol=TOLERANCE), slot
    torch.testing.assert_close(sum_per_slot(_target_logps(model, other), other),
                               sum_per_slot(_target_logps(model, padded), padded), atol=TOLERANCE, rtol=0)


def test_padded_targets_and_metadata_are_exact():
    groups = _groups()
    batch = collate(groups, layout="padded", pad_token_id=0)
    assert batch.num_groups == 3 and batch.group_size == 3
    assert batch.slot_mask.tolist() == [[True, True, False], [True, False, False], [True, True, True]]
    assert batch.input_ids.shape == (6, 12)  # 6 sequences, the longest is 7 + 5
    # slot 1 = group 0 completion 1: first token untrained, then 5 targets predicted by positions 5..9
    row, length = 1, batch.input_ids.shape[1]
    expected_index = [row * length + t for t in range(5, 10)]
    assert batch.target_index[batch.target_slot == 1].tolist() == expected_index
    assert batch.target_ids[batch.target_slot == 1].tolist() == groups[0].completion_ids[1][1:]
    assert batch.slot_lengths().tolist() == [[3, 5, 0], [3, 0, 0], [1, 2, 5]]
    assert batch.scores.tolist()[0] == [1.0, 0.0, 0.0] and batch.labels is None
    assert batch.num_real_tokens() == sum(len(g.prompt_ids) * g.group_size + sum(map(len, g.completion_ids))
                                          for g in groups)


def test_prefix_shared_positions_and_mask():
    group = TokenizedGroup([5, 6], [[7, 8], [9]], [[True, True], [True]])
    batch = collate([group], layout="prefix_shared", pad_token_id=0)
    assert batch.input_ids.tolist() == [[5, 6, 7, 8, 9]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 2]]
    allowed = (batch.attention_mask[0, 0] == 0).int().tolist()
    assert allowed == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]
    # completion 1's only token is predicted by the last prompt position (1), not by position 3
    assert batch.target_index.tolist() == [1, 2, 1] and batch.target_slot.tolist() == [0, 0, 1]
    assert batch.attention_mask.dtype == torch.float32 and batch.attention_mask.min() == MASK_VALUE


def test_default_budget_is_the_longest_unit():
    groups = [TokenizedGroup([1], [[2, 3]], [[True, True]]), TokenizedGroup([4], [[5]], [[True]]),
              TokenizedGroup([6], [[7]], [[True]])]
    batch = collate(groups, layout="packed", pad_token_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3], [4, 5, 0], [6, 7, 0]]  # budget 3: 2 + 2 would not fit


def test_packing_budget_splits_rows_and_pads_are_masked():
    group = TokenizedGroup([1, 2], [[3, 4], [5, 6, 7]], [[True, True], [True, True, True]])
    batch = collate([group], layout="packed", pad_token_id=0, max_tokens_per_row=4)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 0], [1, 2, 5, 6, 7]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0], [0, 1, 2, 3, 4]]
    assert batch.num_real_tokens() == 9
    assert (batch.attention_mask[0, 0, 4] == MASK_VALUE).all()  # the pad attends to nothing


def test_prompt_only_groups_are_rejected():
    with pytest.raises(ValueError, match="prompt-only"):
        collate([TokenizedGroup([1, 2], [], [])], layout="padded", pad_token_id=0)


def test_layouts_agree_on_tokenized_chat_data(tiny_tokenizer):
    """End to end: records -> tokenize_group -> every layout -> the same per-slot sums."""
    from alignkit.data.config import DataConfig
    from alignkit.data.record import Record
    from alignkit.data.tokenize import tokenize_group

    llama = tiny_llama(vocab_size=len(tiny_tokenizer), max_position_embeddings=256).eval()
    user = [{"role": "user", "content": "What is 12 + 30?"}]
    records = [
        Record("listwise", user, [[{"role": "assistant", "content": a}] for a in ("42", "It is 42.", "41")],
               scores=[2.0, 1.0, 0.0]),
        Record("sft", user, [[{"role": "assistant", "content": "42"}, {"role": "user", "content": "Sure?"},
                              {"role": "assistant", "content": "Yes."}]]),
    ]
    groups = [tokenize_group(r, tiny_tokenizer, DataConfig()) for r in records]
    padded = collate(groups, layout="padded", pad_token_id=tiny_tokenizer.pad_token_id)
    expected = sum_per_slot(_target_logps(llama, padded), padded)
    assert padded.slot_lengths()[1].tolist()[0] < len(groups[1].completion_ids[0])  # the user turn is not a target
    for layout in ("packed", "prefix_shared"):
        batch = collate(groups, layout=layout, pad_token_id=tiny_tokenizer.pad_token_id)
        torch.testing.assert_close(sum_per_slot(_target_logps(llama, batch), batch), expected, atol=TOLERANCE, rtol=0)

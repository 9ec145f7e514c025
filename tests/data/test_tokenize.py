"""Chat-template boundaries, train masks, BOS/EOS and truncation on the tiny and SmolLM2 tokenizers."""

from __future__ import annotations

import pytest

from alignkit.data.config import DataConfig
from alignkit.data.record import Record
from alignkit.data.tokenize import TokenizeStats, tokenize_group

USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
CHOSEN = [{"role": "assistant", "content": "It is 4."}]
REJECTED = [{"role": "assistant", "content": "Maybe 5, hard to say."}]
CONVERSATION = [{"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "6"}]
TOKENIZERS = ["tiny_tokenizer", pytest.param("smollm2_tokenizer", marks=pytest.mark.slow)]


def render(tokenizer, messages, generation_prompt=False) -> list[int]:
    """Independent reference: render the whole text and tokenize it in one go."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def trained_text(tokenizer, ids, mask) -> str:
    return tokenizer.decode([t for t, m in zip(ids, mask) if m])


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("prompt", [USER, USER[1:]], ids=["system", "no_system"])  # SmolLM2 adds a default system turn
def test_paired_chat_boundaries_and_masks(name, prompt, request):
    tok = request.getfixturevalue(name)
    group = tokenize_group(Record("paired", prompt, [CHOSEN, REJECTED]), tok, DataConfig())
    assert group.prompt_ids == render(tok, prompt, generation_prompt=True)
    for completion, ids, mask in zip([CHOSEN, REJECTED], group.completion_ids, group.completion_train_mask):
        # the prompt tokens are the same alone and followed by the response
        assert group.prompt_ids + ids == render(tok, prompt + completion)
        assert all(mask)  # single assistant turn: every completion token is trained
        assert trained_text(tok, ids, mask) == completion[0]["content"] + "<|im_end|>\n"
        assert ids.count(tok.eos_token_id) == 1  # EOS once, from the template
    assert group.prompt_ids[:2].count(tok.bos_token_id) <= 1


@pytest.mark.parametrize("name", TOKENIZERS)
@pytest.mark.parametrize("train_on,expected", [("all_assistant", "4<|im_end|>\n6<|im_end|>\n"),
                                               ("last_assistant", "6<|im_end|>\n")])
def test_multi_turn_sft_masks_only_assistant_turns(name, train_on, expected, request):
    tok = request.getfixturevalue(name)
    group = tokenize_group(Record("sft", USER, [CONVERSATION]), tok, DataConfig(train_on=train_on))
    ids, mask = group.completion_ids[0], group.completion_train_mask[0]
    assert group.prompt_ids + ids == render(tok, USER + CONVERSATION)
    assert trained_text(tok, ids, mask) == expected
    untrained = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert "And 3+3?" in untrained and "<|im_start|>assistant\n" in untrained


class CharTokenizer:
    """A throw-away character tokenizer that adds BOS by itself (like Llama's)."""

    bos_token_id, eos_token_id, chat_template = 1, 2, None

    def __call__(self, text, add_special_tokens=True):
        ids = [ord(c) for c in text]
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_plain_strings_get_one_bos_and_one_eos():
    group = tokenize_group(Record("paired", "ab", ["cd", "e"]), CharTokenizer(), DataConfig())
    assert group.prompt_ids == [1, 97, 98]
    assert group.completion_ids == [[99, 100, 2], [101, 2]]
    assert group.completion_train_mask == [[True] * 3, [True] * 2]


def test_plain_strings_without_bos_tokenizer(tiny_tokenizer):
    group = tokenize_group(Record("sft", "Question", [" Answer"]), tiny_tokenizer, DataConfig(chat_template="never"))
    assert group.prompt_ids == tiny_tokenizer("Question", add_special_tokens=False)["input_ids"]
    assert group.completion_ids[0][-1] == tiny_tokenizer.eos_token_id
    assert group.completion_ids[0][:-1] == tiny_tokenizer(" Answer", add_special_tokens=False)["input_ids"]


def test_truncation_policies_are_applied_and_counted():
    tok = CharTokenizer()
    record = Record("paired", "abcdefgh", ["0123456789", "xy"])  # prompt 9 ids with BOS, completions 11 and 3
    stats = TokenizeStats()
    cfg = DataConfig(max_prompt_length=4, max_length=10, prompt_truncation="keep_end")
    group = tokenize_group(record, tok, cfg, stats)
    assert group.prompt_ids == [1, ord("f"), ord("g"), ord("h")]  # BOS kept, then the prompt's end
    assert group.completion_ids == [[ord(c) for c in "012345"], [ord("x"), ord("y"), 2]]
    assert (stats.prompts_truncated, stats.completions_truncated, stats.truncation_rate) == (1, 1, 1.0)
    start = tokenize_group(record, tok, DataConfig(max_prompt_length=4, max_length=10, prompt_truncation="keep_start"))
    assert start.prompt_ids == [1, ord("a"), ord("b"), ord("c")]
    stats = TokenizeStats()
    cfg = DataConfig(max_prompt_length=4, max_length=10, response_truncation="drop")
    assert tokenize_group(record, tok, cfg, stats) is None
    assert dict(stats.dropped) == {"response too long": 1} and stats.groups_out == 0
    tokenize_group(Record("sft", "a", ["b"]), tok, cfg, stats)  # fits: 1 of 2 groups dropped for length
    assert stats.truncation_rate == 0.5


def test_example_id_is_stable_and_content_based(tiny_tokenizer):
    a = tokenize_group(Record("paired", "Q", ["A", "B"], location="x:1"), tiny_tokenizer, DataConfig())
    b = tokenize_group(Record("paired", "Q", ["A", "B"], location="y:9"), tiny_tokenizer, DataConfig())
    c = tokenize_group(Record("paired", "Q", ["A", "C"], location="x:1"), tiny_tokenizer, DataConfig())
    assert a.example_id == b.example_id != c.example_id and len(a.example_id) == 16

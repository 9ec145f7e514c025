"""Published dataset layouts (fixtures in tests/data/published/, sources in its README.md) load as their
source means them: the prompt's turns are the source's turns, no completion repeats the prompt, system
prompts kept, K responses with their scores/ranks in order, the chat template applied, and whatever is
left behind is named in the data summary."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignkit.data.cli import data_app
from alignkit.data.config import DataConfig
from alignkit.data.layouts import normalize
from alignkit.data.paths import get_path, parse_path, unused_fields
from alignkit.data.pipeline import read_records
from alignkit.data.record import Record, text_of
from alignkit.data.summary import describe_records, prompt_in_completion
from alignkit.data.tokenize import tokenize_group
from alignkit.errors import ConfigError, DataError

HERE = Path(__file__).parent / "published"
LF_INFO = HERE / "llamafactory" / "dataset_info.json"
runner = CliRunner()


def user(text: str) -> dict:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def system(text: str) -> dict:
    return {"role": "system", "content": text}


def load(name: str, columns: str = "trl", column_map: dict | None = None, fmt: str = "auto") -> list[Record]:
    records, errors = read_records(str(HERE / name) if "#" not in name else name, fmt, columns, column_map)
    assert errors == [], [str(e) for e in errors]
    return records


def assert_no_prompt_in_completions(records: list[Record]) -> None:
    for record in records:
        assert not prompt_in_completion(record), record.location
        for completion in record.completions:
            assert not (isinstance(completion, list) and completion and completion[0]["role"] == "user"), record.location


# ---------------------------------------------------------------- Anthropic/hh-rlhf


def test_hh_rlhf_transcripts_have_their_shared_turns_as_prompt():
    records = load("hh_rlhf.jsonl")  # no option: a pair of Human/Assistant transcripts reads as hh-rlhf
    assert records == load("hh_rlhf.jsonl", columns="hh_rlhf")
    single, multi, mid_turn, runaway = records
    assert single.prompt == [user("What are some cuss words in english?")]
    assert single.completions[1] == [assistant("Here's an incomplete list: ass, dick, bugger.")]
    assert multi.prompt == [user("How do I make a cake?"), assistant("Do you want a simple sponge or something fancier?"),
                            user("A simple sponge please.")]  # multi-turn kept as alternating messages
    assert multi.completions == [[assistant("Mix 200g flour, 200g sugar, 200g butter and 4 eggs, then bake at 180C "
                                            "for 25 minutes.")], [assistant("Buy one at the store.")]]
    # both answers start with "I": the shared text ends inside the answers, the cut is at the turn boundary
    assert mid_turn.prompt == [user("Is it safe to eat raw cookie dough?")]
    assert mid_turn.completions[0][0]["content"].startswith("I would avoid it")
    assert mid_turn.completions[1][0]["content"] == "I think it is fine, everyone does it."
    # an answer that runs on into a made-up Human turn keeps it (TRL's hh-rlhf script does the same)
    assert runaway.completions[1] == [assistant("Sydney.\n\nHuman: Are you sure?\n\nAssistant: Yes.")]
    assert all(r.format == "paired" and r.extra == {} for r in records)


def test_hh_rlhf_quirks_fail_located():
    from alignkit.data.formats import parse_row
    from alignkit.data.sources import RawRow

    with pytest.raises(DataError) as info:  # transcripts that differ before any Assistant turn
        parse_row(RawRow("hh.jsonl:3", {"chosen": "\n\nHuman: A\n\nAssistant: x", "rejected": "\n\nHuman: B\n\nAssistant: x"}))
    assert info.value.location == "hh.jsonl:3" and info.value.field == "chosen"
    with pytest.raises(DataError, match="non-empty response"):  # an empty final answer
        parse_row(RawRow("hh.jsonl:4", {"chosen": "\n\nHuman: A\n\nAssistant: yes", "rejected": "\n\nHuman: A\n\nAssistant:"}))
    with pytest.raises(DataError, match="prompt column"):  # plain strings that are not transcripts: name the choices
        parse_row(RawRow("x.jsonl:1", {"chosen": "yes", "rejected": "no"}))


# ---------------------------------------------------------------- HuggingFaceH4/ultrafeedback_binarized


def test_ultrafeedback_binarized_trains_the_question_once():
    records = load("ultrafeedback_binarized.jsonl")
    first = records[0]
    assert first.prompt == [user("how can i develop a habit of drawing daily")]
    assert first.completions == [[assistant("Start small: draw for ten minutes at the same time each day.")],
                                 [assistant("Just draw.")]]
    assert [r.scores for r in records] == [[8.5, 4.0], [9.0, 3.5], [7.0, 7.0]]
    assert set(first.extra) == {"prompt_id", "messages"}
    assert_no_prompt_in_completions(records)
    lines = describe_records(records)
    assert any("3 of 3 records: prompt repeated at the start of chosen/rejected: cut out" in line for line in lines)
    assert any("columns not trained on (kept for reward functions): messages, prompt_id" in line for line in lines)
    assert any("1 pairs with equal chosen/rejected scores" in line for line in lines)


def test_ultrafeedback_binarized_tokens_hold_the_question_once(tiny_tokenizer):
    record = load("ultrafeedback_binarized.jsonl")[1]
    group = tokenize_group(record, tiny_tokenizer, DataConfig())
    for ids in group.completion_ids:
        text = tiny_tokenizer.decode(group.prompt_ids + ids)
        assert text.count("Which planet is closest to the sun?") == 1
        assert text.startswith("<|im_start|>user\nWhich planet")


def test_a_prompt_repeated_inside_completions_is_counted():
    records = [Record("sft", "Explain photosynthesis briefly.", ["Explain photosynthesis briefly. Plants make sugar."],
                      location="f:1"), Record("sft", "Hi", ["Hi there"], location="f:2")]  # too short to count
    assert [prompt_in_completion(r) for r in records] == [True, False]
    assert any("1 of 2 records have their prompt also inside a completion (e.g. f:1)" in line
               for line in describe_records(records))


# ---------------------------------------------------------------- openbmb/UltraFeedback and Nectar: nested paths


def test_paths_reach_into_lists_and_name_what_they_leave():
    row = json.loads((HERE / "ultrafeedback_raw.jsonl").read_text().splitlines()[0])
    assert parse_path("completions[].fine-grained_score") == ("completions", [None, "fine-grained_score"])
    assert get_path(row, "completions[].model") == ["alpaca-7b", "gpt-4", "llama-2-7b-chat", "starchat"]
    assert get_path(row, "completions[1].annotations.helpfulness.Rating") == "4"
    assert get_path(row, "models[-1]") == "starchat"
    assert unused_fields(row, ["completions[].response", "completions[].overall_score"]) == [
        "completions[].annotations", "completions[].critique", "completions[].custom_system_prompt",
        "completions[].fine-grained_score", "completions[].model", "completions[].principle"]
    with pytest.raises(ValueError, match="expected .key"):
        parse_path("completions[x]")


def test_ultrafeedback_raw_is_listwise_with_every_scored_response():
    records = load("ultrafeedback_raw.jsonl", columns="ultrafeedback")
    explicit = load("ultrafeedback_raw.jsonl", column_map={
        "prompt": "instruction", "responses": "completions[].response", "scores": "completions[].overall_score"})
    assert [(r.prompt, r.completions, r.scores) for r in records] == [(r.prompt, r.completions, r.scores) for r in explicit]
    colors, french, arithmetic = records
    assert colors.format == "listwise" and colors.prompt == "Name three primary colors."
    assert colors.completions == ["Red, green and blue.", "Red, yellow and blue are the traditional primary colors.",
                                  "Sure! The primary colors are red, yellow and blue.", "Purple."]
    assert colors.scores == [6.0, 8.5, 7.5, 2.0]  # in list order, each with its own response
    assert french.scores == [9.0, 6.0, 6.0]  # the tie is kept; pairing drops tied pairs (counted)
    # the completion without an overall_score is dropped, and said
    assert arithmetic.completions == ["42", "7 x 6 = 36", "The answer is 42."] and arithmetic.scores == [8.0, 3.0, 7.0]
    assert "response without a score dropped (scores[1])" in arithmetic.notes
    lines = describe_records(records)
    assert any("dropped completions[].annotations" in line for line in lines)
    assert any("1 of 3 records: response without a score dropped" in line for line in lines)
    fine = load("ultrafeedback_raw.jsonl", columns="ultrafeedback", column_map={"scores": "completions[].fine-grained_score"})
    assert fine[0].scores == [3.5, 4.75, 4.5, 1.25] and len(fine[2].completions) == 3  # "N/A" counts as missing


def test_ultrafeedback_raw_without_the_option_names_it():
    records, errors = read_records(str(HERE / "ultrafeedback_raw.jsonl"))
    assert records == [] and "data.columns=ultrafeedback" in str(errors[0])


def test_nectar_is_listwise_ranked_with_transcript_prompts():
    records = load("nectar.jsonl", columns="nectar")
    water, cat = records
    assert water.prompt == [user("What is the boiling point of water at sea level?")]
    assert len(water.completions) == 7 and water.completions[0] == [assistant("100 degrees Celsius (212 F).")]
    assert water.scores == [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0]  # rank 1 = best = highest score
    assert cat.prompt == [user("Suggest a name for a cat."), assistant("How about Whiskers?"),
                          user("Something more unusual please.")]
    assert len(cat.completions) == 3 and cat.scores == [-3.0, -1.0, -2.0]
    best = max(range(3), key=lambda i: cat.scores[i])
    assert cat.completions[best] == [assistant("Try Pistachio or Lord Fluffington.")]  # by rank, not by position
    assert set(water.extra) == {"turns", "num_responses", "source", "good_natured"}
    assert cat.notes == ["dropped answers[].model", "empty response dropped (responses[3])"]  # "" of 4 answers
    assert any("dropped answers[].model" in line for line in describe_records(records))


def test_nectar_is_never_silently_prompt_only():
    records, errors = read_records(str(HERE / "nectar.jsonl"))
    assert records == [] and len(errors) == 2
    message = str(errors[0])
    assert "answers" in message and "data.columns=nectar" in message and "data.format=prompt" in message
    prompt_only = load("nectar.jsonl", fmt="prompt")  # asked for explicitly: the answers stay a column
    assert all(r.format == "prompt" and "answers" in r.extra for r in prompt_only)


# ---------------------------------------------------------------- LLaMA-Factory


def test_llamafactory_dataset_info_entries_load_by_name():
    sft = load(f"{LF_INFO}#alpaca_sft")
    assert sft[0].prompt == [system("You are a translator."), user("Translate to German.\nGood night.")]
    assert sft[0].completions == [[assistant("Gute Nacht.")]]
    # history: its responses are trained in SFT, as in LLaMA-Factory; an empty input adds no "\n"
    assert sft[1].prompt == [system("You are a translator."), user("Translate to German: hello")]
    assert sft[1].completions == [[assistant("Hallo."), user("And now 'thank you'?"), assistant("Danke.")]]
    ranking = load(f"{LF_INFO}#alpaca_rank")
    assert ranking[0].prompt == [user("Add the numbers.\n12 and 30")]
    assert ranking[0].completions == [[assistant("42")], [assistant("1230")]]
    dpo = load(f"{LF_INFO.parent}#dpo_en_demo")  # DIR#NAME as LLaMA-Factory's dataset_dir + dataset
    assert dpo[1].prompt == [system("You answer in one word."), user("Colour of the sky?"), assistant("Blue."),
                             user("And at night?")]
    assert dpo[1].completions == [[assistant("Black.")], [assistant("It is usually dark blue or black.")]]
    kto = load(f"{LF_INFO}#kto_en_demo")  # messages + label, role/content tags
    assert [(r.format, r.labels) for r in kto] == [("unpaired", [1.0]), ("unpaired", [0.0])]
    assert kto[1].prompt == [user("Compare the hippocampus and the prefrontal cortex.")]
    assert kto[1].completions == [[assistant("They are the same thing.")]]


def test_llamafactory_columns_it_does_not_map_are_named():
    plain = load(f"{LF_INFO}#alpaca_no_columns")  # no columns: LLaMA-Factory reads no system/history
    assert plain[1].prompt == [user("And now 'thank you'?")]
    assert any("columns not trained on (kept for reward functions): history, system" in line
               for line in describe_records(plain))
    tools = load(f"{LF_INFO}#glaive_toolcall_demo")
    assert tools[0].completions[0][1] == {"role": "tool", "content": '{"temperature": 18}'}  # observation turn
    assert any("dropped tools (tool descriptions" in line for line in describe_records(tools))
    with pytest.raises(DataError, match="loading scripts are never run"):
        read_records(f"{LF_INFO}#remote_script")
    with pytest.raises(DataError, match="named 'nope' / found alpaca_no_columns, alpaca_rank"):
        read_records(f"{LF_INFO}#nope")


def test_llamafactory_copied_columns_keep_query_and_system():
    path = str(HERE / "llamafactory" / "alpaca_sft.json")
    records = load(path, columns="llamafactory", column_map={
        "prompt": "instruction", "query": "input", "response": "output", "system": "system", "history": "history"})
    assert records[0].prompt == [system("You are a translator."), user("Translate to German.\nGood night.")]
    _, errors = read_records(path, "auto", "llamafactory", {"completion": "output"})  # TRL's name: not LLaMA-Factory's
    assert errors and errors[0].field == "column_map" and "LLaMA-Factory keys" in errors[0].detail


def test_llamafactory_broken_turn_order_is_located():
    from alignkit.data.formats import parse_row
    from alignkit.data.sources import RawRow

    row = {"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}
    with pytest.raises(DataError) as info:
        parse_row(RawRow("d.json:2", row), preset="llamafactory")
    assert info.value.field == "conversations[1].from" and "LLaMA-Factory alternates" in info.value.detail


# ---------------------------------------------------------------- OpenRLHF


def test_openrlhf_keys_and_chat_template_forms():
    sft = load("openrlhf_sft.jsonl", columns="openrlhf", column_map={"input_key": "question", "output_key": "response"})
    assert (sft[1].format, sft[1].prompt, sft[1].completions, sft[1].extra) == ("sft", "What is the square root of 81?",
                                                                                 ["9"], {"id": "q2"})
    chat = load("openrlhf_chat_sft.jsonl", columns="openrlhf")  # --apply_chat_template, no --output_key
    assert chat[1].prompt == [user("Hi!"), assistant("Hello."), user("Count to three.")]
    assert chat[1].completions == [[assistant("1, 2, 3.")]]  # the last turn, as OpenRLHF trains it
    pairs = load("openrlhf_pairs.jsonl", columns="openrlhf",
                 column_map={"prompt_key": "context", "chosen_key": "good", "rejected_key": "bad"})
    assert [(r.prompt, r.completions, r.scores) for r in pairs][0] == (
        "Is the earth flat?", ["No, it is an oblate spheroid.", "Yes."], [2.0, 0.0])
    prompts = load("openrlhf_prompts.jsonl", columns="openrlhf", column_map={"input_key": "context_messages"})
    assert prompts[0].format == "prompt" and prompts[0].extra == {"answer": "42"}


def test_openrlhf_sft_is_templated_or_input_templated(tiny_tokenizer):
    record = load("openrlhf_sft.jsonl", columns="openrlhf", column_map={"input_key": "question", "output_key": "response"})[1]
    templated = tokenize_group(record, tiny_tokenizer, DataConfig())  # --apply_chat_template
    assert tiny_tokenizer.decode(templated.prompt_ids) == (
        "<|im_start|>user\nWhat is the square root of 81?<|im_end|>\n<|im_start|>assistant\n")
    assert tiny_tokenizer.decode(templated.completion_ids[0]) == "9<|im_end|>\n"
    plain = tokenize_group(record, tiny_tokenizer, DataConfig(chat_template="never",
                                                              input_template="User: {}\nAssistant: "))
    assert tiny_tokenizer.decode(plain.prompt_ids) == "User: What is the square root of 81?\nAssistant: "
    assert plain.example_id == templated.example_id  # the same record, whatever the rendering


# ---------------------------------------------------------------- orca pairs and gsm8k


def test_orca_pairs_keep_system_prompts_and_scores():
    records = load("orca_dpo_pairs.jsonl", columns="orca")
    detailed, no_system, tie, unrated = records
    assert detailed.prompt == [system("You are an AI assistant. You will be given a task. You must generate a "
                                      "detailed and long answer."), user("Generate a sentence about a restaurant.")]
    assert detailed.completions[0] == [assistant("The Golden Palace is a riverside restaurant serving Chinese food.")]
    assert detailed.scores == [9.0, 4.0]
    assert no_system.prompt == "What is the capital of France?"  # an empty system column adds no system turn
    assert no_system.scores == [8.0, 3.0]  # swapped by the judge: the chosen column is the better-rated one
    assert tie.scores == [7.0, 7.0] and unrated.scores is None
    assert "no rating: pair kept without scores" in unrated.notes
    lone = load("orca_dpo_pairs.jsonl", column_map={"prompt": "input"})  # the plain map: not rejected
    assert lone[0].prompt[0] == system("You are an AI assistant. You will be given a task. You must generate a "
                                       "detailed and long answer.") and lone[0].scores is None
    assert lone[0].extra["chosen_score"] == 9.0
    assert any("chosen_score without its partner: kept as a column" in line for line in describe_records(lone))


def test_gsm8k_is_prompt_only_with_its_answer_for_rewards(tiny_tokenizer):
    records = load("gsm8k.jsonl", column_map={"prompt": "question"})
    assert [r.format for r in records] == ["prompt", "prompt"]
    assert records[0].extra["answer"].endswith("#### 72")
    group = tokenize_group(records[0], tiny_tokenizer, DataConfig())
    assert group.extra["answer"].endswith("#### 72") and group.completion_ids == []
    assert tiny_tokenizer.decode(group.prompt_ids).startswith("<|im_start|>user\nNatalia sold clips")
    _, errors = read_records(str(HERE / "gsm8k.jsonl"))
    assert "column_map {prompt: question} on the source" in str(errors[0])


# ---------------------------------------------------------------- data.chat_template


@pytest.mark.parametrize("mode,templated", [("auto", True), ("always", True), ("never", False)])
def test_chat_template_switch_applies_to_every_string_record(tiny_tokenizer, mode, templated):
    records = [Record("paired", "Q1?", ["A.", "B."]), Record("prompt", "Q2?", [])]
    for record in records:
        group = tokenize_group(record, tiny_tokenizer, DataConfig(chat_template=mode))
        assert tiny_tokenizer.decode(group.prompt_ids).startswith("<|im_start|>user\n") is templated


def test_chat_template_switch_errors_name_the_choices(tiny_tokenizer):
    class NoTemplate:
        chat_template = None

    with pytest.raises(ConfigError, match="no chat template"):
        tokenize_group(Record("sft", "Q", ["A"]), NoTemplate(), DataConfig(chat_template="always"))
    with pytest.raises(ConfigError, match="chat_template=never but the data is chat messages"):
        tokenize_group(Record("sft", [user("Q")], [[assistant("A")]]), tiny_tokenizer, DataConfig(chat_template="never"))
    with pytest.raises(ConfigError, match="Choose one"):
        DataConfig(chat_template="always", input_template="User: {}").validate()


# ---------------------------------------------------------------- the command line


def test_validate_and_inspect_say_what_was_dropped_or_cut():
    result = runner.invoke(data_app, ["validate", str(HERE / "ultrafeedback_raw.jsonl"), "--columns", "ultrafeedback"])
    assert result.exit_code == 0, result.output
    assert "3 valid records (3 listwise), 0 problems" in result.output
    assert "dropped completions[].annotations" in result.output
    assert "1 of 3 records: response without a score dropped (scores[1])" in result.output
    result = runner.invoke(data_app, ["validate", str(HERE / "nectar.jsonl")])
    assert result.exit_code == 1 and "data.columns=nectar" in result.output
    result = runner.invoke(data_app, ["inspect", f"{LF_INFO}#alpaca_rank", "--n", "1"])
    assert result.exit_code == 0, result.output
    assert "<|im_start|>user\nAdd the numbers.\n12 and 30<|im_end|>" in result.output  # the template is applied
    result = runner.invoke(data_app, ["inspect", str(HERE / "ultrafeedback_binarized.jsonl"), "--n", "1"])
    assert "prompt repeated at the start of chosen/rejected: cut out" in result.output
    assert result.output.count("how can i develop a habit of drawing daily") == 1


def test_layout_normalize_is_pure():
    row = {"prompt": "p", "answers": [{"answer": "a", "rank": 1}, {"answer": "b", "rank": 2}]}
    before = json.dumps(row)
    notes: list[str] = []
    out = normalize(row, "x:1", "nectar", None, notes)
    assert json.dumps(row) == before and out["responses"] == ["a", "b"] and "answers" not in out


def test_text_of_joins_message_contents():
    assert text_of([user("a"), assistant("b")]) == "a\nb"


# ---------------------------------------------------------------- 2-step tiny trainings on the published layouts

P = str(HERE)
RUNS = {
    "ultrafeedback_binarized_dpo": (["recipe=dpo_tiny", f"data.train=[{{path: {P}/ultrafeedback_binarized.jsonl}}]"],
                                    "3 of 3 records: prompt repeated at the start of chosen/rejected: cut out"),
    "llamafactory_kto": (["recipe=kto_tiny", f"data.train=[{{path: '{P}/llamafactory#kto_en_demo'}}]"], None),
    "gsm8k_grpo": (["recipe=grpo_tiny", f"data.train=[{{path: {P}/gsm8k.jsonl, column_map: {{prompt: question}}}}]",
                    "generation.max_new_tokens=8"], "columns not trained on (kept for reward functions): answer"),
    "nectar_lipo": (["recipe=lipo_tiny", f"data.train=[{{path: {P}/nectar.jsonl, columns: nectar}}]"],
                    "dropped answers[].model"),
    "ultrafeedback_raw_paths": (["recipe=lipo_tiny", f"data.train=[{{path: {P}/ultrafeedback_raw.jsonl, column_map: "
                                 "{prompt: instruction, responses: 'completions[].response', "
                                 "scores: 'completions[].overall_score'}}]"], "response without a score dropped"),
    "hh_rlhf_dpo": (["recipe=dpo_tiny", f"data.train=[{{path: {P}/hh_rlhf.jsonl}}]"], None),
    "orca_dpo": (["recipe=dpo_tiny", f"data.train=[{{path: {P}/orca_dpo_pairs.jsonl, columns: orca}}]"],
                 "no rating: pair kept without scores"),
    "openrlhf_sft": (["recipe=sft_tiny", f"data.train=[{{path: {P}/openrlhf_sft.jsonl, columns: openrlhf, "
                      "column_map: {input_key: question, output_key: response}}]"], None),
}
FAST = ("ultrafeedback_binarized_dpo", "llamafactory_kto", "gsm8k_grpo")


@pytest.mark.parametrize("name", [n if n in FAST else pytest.param(n, marks=pytest.mark.slow) for n in RUNS])
def test_two_step_tiny_training_on_a_published_layout(tmp_path, capfd, name):
    from alignkit.run import train_from_overrides

    overrides, summary = RUNS[name]
    code = train_from_overrides([*overrides, "data.eval=[]", "trainer.max_steps=2", "trainer.batch_size=2",
                                 "trainer.micro_batch_size=1", "trainer.export=false", f"output_dir={tmp_path}",
                                 "run_name=run", f"trainer.reference_cache_dir={tmp_path / 'ref'}"])
    captured = capfd.readouterr()
    log = " ".join((captured.out + captured.err).split())  # rich wraps long lines
    assert code == 0, log[-2000:]
    steps = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if s.get("split", "train") == "train"] == [1, 2]
    if summary is not None:
        assert summary in log


# ---------------------------------------------------------------- what already worked keeps working


def test_ultrachat_sharegpt_trl_and_verl_layouts_still_load(tmp_path, write_jsonl):
    import pyarrow as pa
    import pyarrow.parquet as pq

    chat = [user("Hi"), assistant("Hello!"), user("Bye"), assistant("Goodbye!")]
    ultrachat = write_jsonl(tmp_path / "ultrachat.jsonl", [{"prompt": "Hi", "prompt_id": "x", "messages": chat}])
    record = load(str(ultrachat))[0]
    assert (record.format, record.prompt, record.completions) == ("sft", [user("Hi")], [chat[1:]])
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [{"conversations": [
        {"from": "system", "value": "Be kind."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]}])
    record = load(str(sharegpt), columns="llamafactory")[0]
    assert (record.prompt, record.completions) == ([system("Be kind."), user("Hi")], [[assistant("Hello!")]])
    kto = write_jsonl(tmp_path / "kto.jsonl", [{"prompt": [user("Q?")], "completion": [assistant("A.")], "label": False}])
    assert load(str(kto))[0].labels == [0.0]
    verl = tmp_path / "train.parquet"
    pq.write_table(pa.Table.from_pylist([{"data_source": "openai/gsm8k", "prompt": [user("What is 6 * 7?")],
                                          "ability": "math", "reward_model": {"style": "rule", "ground_truth": "42"},
                                          "extra_info": {"split": "train", "index": 0}}]), verl)
    record = load(str(verl))[0]
    assert record.format == "prompt" and record.extra["reward_model"]["ground_truth"] == "42"


def test_prompt_and_system_rules_follow_trl_and_say_so():
    from alignkit.data.formats import parse_row
    from alignkit.data.sources import RawRow

    chosen, rejected = [user("Q?"), assistant("A")], [user("Q?"), assistant("B")]
    differs = parse_row(RawRow("f:1", {"prompt": "Another question?", "chosen": chosen, "rejected": rejected}))
    assert differs.prompt == [user("Q?")] and differs.completions == [[assistant("A")], [assistant("B")]]
    assert differs.notes == ["prompt column differs from the conversations' shared turns: the turns were used (TRL's rule)"]
    listed = parse_row(RawRow("f:2", {"prompt": [system("S"), user("Q?")], "chosen": chosen, "rejected": rejected}))
    assert listed.prompt == [system("S"), user("Q?")] and listed.completions == [[assistant("A")], [assistant("B")]]
    more = parse_row(RawRow("f:2", {"prompt": [user("Q?")], "chosen": [system("S")] + chosen,
                                    "rejected": [system("S")] + rejected}))
    assert more.prompt == [system("S"), user("Q?")] and more.completions == [[assistant("A")], [assistant("B")]]
    own = parse_row(RawRow("f:3", {"system": "Column.", "messages": [system("Own."), user("Q?"), assistant("A")]}))
    assert own.prompt == [system("Own."), user("Q?")] and own.extra == {"system": "Column."}
    assert own.notes == ["system column not used: the conversation has its own system message"]
    kto = parse_row(RawRow("f:4", {"messages": [user("Q?"), assistant("A"), user("More?"), assistant("B")], "label": 1}))
    assert (kto.format, kto.prompt, kto.completions, kto.labels) == (
        "unpaired", [user("Q?"), assistant("A"), user("More?")], [[assistant("B")]], [1.0])
    mix = parse_row(RawRow("f:6", {"prompt": [user("Q?")], "completion": [user("Q?"), assistant("A")], "label": True}))
    assert (mix.prompt, mix.completions) == ([user("Q?")], [[assistant("A")]])  # argilla/kto-mix-15k's rows
    assert mix.notes == ["prompt repeated at the start of the completion: cut out"]
    rfl = parse_row(RawRow("f:5", {"prompt": "What is 2+2?", "label": "4"}))  # OpenRLHF label_key for rewards
    assert (rfl.format, rfl.extra) == ("prompt", {"label": "4"})


def test_llamafactory_preset_reads_openai_messages_and_refuses_an_empty_instruction():
    from alignkit.data.formats import parse_row
    from alignkit.data.sources import RawRow

    row = {"messages": [system("S"), user("Q"), assistant("A")], "label": True}  # kto_en_demo's rows, no json
    record = parse_row(RawRow("f:1", row), preset="llamafactory")
    assert (record.format, record.prompt, record.completions, record.labels) == (
        "unpaired", [system("S"), user("Q")], [[assistant("A")]], [1.0])
    with pytest.raises(DataError, match="a non-empty instruction"):
        parse_row(RawRow("f:2", {"output": "x"}), preset="llamafactory")

"""Issue 15's acceptance pass: cases a new user hit that the first fixtures did not cover, each checked to
fail before its fix. Fixtures (hand-written from the published schemas) in tests/data/published/acceptance/."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from alignkit.data.cli import data_app
from alignkit.data.pipeline import read_records
from alignkit.data.summary import describe_records

HERE = Path(__file__).parent / "published" / "acceptance"
runner = CliRunner()


def _invoke(*args: str):
    result = runner.invoke(data_app, list(args), env={"COLUMNS": "1000", "HF_DATASETS_OFFLINE": "1"})
    result.text = result.output + ("" if result.exception is None else str(result.exception))
    return result


# ---------------------------------------------------------------- hh-rlhf: transcripts differing in an earlier turn


def test_hh_rlhf_pair_differing_in_an_earlier_turn_is_named_in_the_summary():
    """TRL's hh-rlhf rule (shared prefix up to the last common Assistant tag) leaves the later Human turns
    inside both completions as text; that trains the model to write the user's turns, so it is counted."""
    records, errors = read_records(str(HERE / "hh_rlhf_earlier_turn.jsonl"), "auto", "trl", None)
    assert errors == []
    earlier, last_only = records
    assert earlier.prompt == [{"role": "user", "content": "How do I bake bread?"}]
    assert "\n\nHuman: How long?" in earlier.completions[0][0]["content"]
    assert last_only.prompt[-1] == {"role": "user", "content": "What's your favorite one?"}
    lines = describe_records(records)
    assert any(line.startswith("1 of 2 records: transcripts differ before their last turn") and
               "hh_rlhf_earlier_turn.jsonl:1" in line for line in lines), lines


def test_conversations_differing_in_an_earlier_turn_are_named_in_the_summary():
    records, errors = read_records(str(HERE / "conversations_earlier_turn.jsonl"), "auto", "trl", None)
    assert errors == []
    (record,) = records
    assert record.prompt == [{"content": "Hi", "role": "user"}]
    assert [m["role"] for m in record.completions[0]] == ["assistant", "user", "assistant"]
    assert any("differ before their last turn" in line for line in describe_records(records))


# ---------------------------------------------------------------- orca pairs without the option


def test_orca_pairs_without_the_option_name_it():
    """The system column is taken out before the pair is parsed, so the hint must not need it."""
    result = _invoke("validate", str(HERE / "orca_no_option.jsonl"))
    assert result.exit_code != 0
    assert "use data.columns=orca" in result.text
    result = _invoke("validate", str(HERE / "orca_no_option.jsonl"), "--columns", "orca")
    assert result.exit_code == 0, result.output


# ---------------------------------------------------------------- a hub snapshot's subset folders without a README


def test_subset_folders_without_readme_are_not_merged():
    """openai/gsm8k as files (main/ and socratic/, each train/test) without its README: datasets' layout rules
    merge both subsets' train files; the source must say so and take the sub-folder as the subset."""
    folder = str(HERE / "gsm8k_snapshot")
    result = _invoke("validate", folder, "--column-map", "prompt=question")
    assert result.exit_code != 0
    assert "['main/', 'socratic/']" in result.text and "subset" in result.text
    records, errors = read_records(folder, "auto", "trl", {"prompt": "question"}, subset="main")
    assert errors == [] and len(records) == 1 and records[0].extra["answer"].endswith("#### 72")
    assert "**" not in records[0].extra["answer"]  # not the socratic answer
    records, _ = read_records(folder, "auto", "trl", {"prompt": "question"}, subset="main", split="test")
    assert [r.extra["answer"][-2:] for r in records] == ["10"]
    result = _invoke("validate", folder, "--subset", "nope", "--column-map", "prompt=question")
    assert result.exit_code != 0 and "main/" in result.text


@pytest.mark.parametrize("subset", ["main", "socratic"])
def test_subset_folder_reads_only_its_files(subset):
    records, errors = read_records(str(HERE / "gsm8k_snapshot"), "auto", "trl", {"prompt": "question"}, subset=subset)
    assert errors == [] and len(records) == 1
    assert ("**" in records[0].extra["answer"]) == (subset == "socratic")


# ---------------------------------------------------------------- alignkit data inspect / validate options

OPENRLHF_SFT = Path(__file__).parent / "published" / "openrlhf_sft.jsonl"


def test_inspect_takes_the_chat_template_switch_and_openrlhf_input_template():
    """Without --apply_chat_template OpenRLHF renders input_template; inspect shows what training would."""
    args = ["inspect", str(OPENRLHF_SFT), "--n", "1", "--columns", "openrlhf", "--column-map", "input_key=question",
            "--column-map", "output_key=response"]
    templated = _invoke(*args)
    assert templated.exit_code == 0, templated.text
    assert "<|im_start|>user" in templated.output
    plain = _invoke(*args, "--chat-template", "never", "--input-template", "User: {}\nAssistant: ")
    assert plain.exit_code == 0, plain.text
    assert "<|im_start|>" not in plain.output.split("-- completion")[0] and "User: " in plain.output
    bad = _invoke(*args, "--chat-template", "sometimes")
    assert bad.exit_code != 0 and "auto, always, never" in bad.text


def test_inspect_with_overrides_loads_the_config_models_tokenizer(monkeypatch):
    from alignkit.models import load

    seen = []
    original = load.load_tokenizer_for

    def spy(cfg):
        seen.append(cfg)
        return original(cfg)

    monkeypatch.setattr(load, "load_tokenizer_for", spy)
    result = _invoke("inspect", "recipe=sft_tiny", f"data.train={HERE / 'orca_no_option.jsonl'}", "data.columns=orca",
                     "data.eval_fraction=0", "--n", "1")
    assert result.exit_code == 0, result.text
    assert len(seen) == 1 and seen[0].name_or_path == "tiny"


def test_a_glob_the_shell_expanded_is_named():
    files = sorted(str(p) for p in (HERE / "gsm8k_snapshot" / "main").glob("*.jsonl"))
    result = _invoke("validate", *files)
    assert result.exit_code != 0
    assert "did the shell expand a glob? Quote it" in result.text


# ---------------------------------------------------------------- LLaMA-Factory's data folder without an entry name

LF = Path(__file__).parent / "published" / "llamafactory"


@pytest.mark.parametrize("path", [str(LF), str(LF) + "/", str(LF / "dataset_info.json")])
def test_llamafactory_folder_or_info_file_without_an_entry_names_the_entries(path):
    """LLaMA-Factory's data/ folder read as one source mixed alpaca, ranking and KTO files (some rows trained,
    the rest reported as bad); the whole dataset_info.json was 'a list of records' expected. Both ask for #NAME."""
    result = _invoke("validate", path)
    assert result.exit_code != 0
    assert "#NAME" in result.text and "entries are" in result.text, result.text
    entry = sorted(__import__("json").loads((LF / "dataset_info.json").read_text()))[0]
    assert entry in result.text


def test_hh_rlhf_pair_with_the_same_reply_twice_is_named():
    """hh-rlhf has rows whose two transcripts are identical; the pair trains nothing and must be counted.
    An empty final reply ('\\n\\nAssistant:' with nothing) is a located problem."""
    records, errors = read_records(str(HERE / "hh_rlhf_quirks.jsonl"), "auto", "trl", None)
    assert len(errors) == 1 and str(errors[0]).startswith(f"{HERE / 'hh_rlhf_quirks.jsonl'}:2: rejected"), errors
    lines = describe_records(records)
    assert any(line.startswith("1 pairs whose chosen and rejected are the same text") and
               "hh_rlhf_quirks.jsonl:1" in line for line in lines), lines
    assert records[2].prompt[-1] == {"role": "user", "content": "more"}


def test_prompt_response_rows_under_an_sft_loss_name_the_column_map(tmp_path):
    """{prompt, response} rows read as prompt-only data ('response' kept as a column); an SFT/DPO loss then
    refuses them, and the refusal says which column to map instead of only 'pick another loss'."""
    from alignkit.data.config import DataConfig
    from alignkit.data.views import to_view
    from alignkit.errors import ConfigError

    path = tmp_path / "prompt_response.jsonl"
    path.write_text('{"prompt": "Say hi", "response": "Hi!"}\n')
    records, errors = read_records(str(path), "auto", "trl", None)
    assert errors == [] and records[0].format == "prompt"
    with pytest.raises(ConfigError) as info:
        to_view(records, "sft", DataConfig())
    assert "data.column_map={completion: response}" in str(info.value)


def test_inspect_shows_each_completions_role_and_score():
    """A user checking that K responses kept their scores (UltraFeedback, Nectar) or labels (KTO) sees them."""
    published = Path(__file__).parent / "published"
    paired = _invoke("inspect", str(published / "ultrafeedback_binarized.jsonl"), "--n", "1")
    assert paired.exit_code == 0, paired.text
    assert "-- completion 0 (chosen, score " in paired.output and "-- completion 1 (rejected, score " in paired.output
    listwise = _invoke("inspect", str(published / "ultrafeedback_raw.jsonl"), "--columns", "ultrafeedback", "--n", "1")
    records, _ = read_records(str(published / "ultrafeedback_raw.jsonl"), "auto", "ultrafeedback", None)
    assert f"-- completion 0 (score {records[0].scores[0]:g})" in listwise.output, listwise.text


def test_nested_subset_folders_are_not_merged_either():
    """data/en/ and data/fr/ (each with train files, no README): the subsets sit one level down."""
    folder = str(HERE / "nested_subsets")
    result = _invoke("validate", folder, "--column-map", "prompt=question")
    assert result.exit_code != 0 and "['data/en/', 'data/fr/']" in result.text, result.text
    records, errors = read_records(folder, "auto", "trl", {"prompt": "question"}, subset="fr")
    assert errors == [] and [r.extra["answer"][-2:] for r in records] == ["10"]

"""Settings of the data pipeline, as OmegaConf structured-config dataclasses.

``DataConfig`` holds every knob of loading, parsing, converting, tokenizing and batching; the
lead composes it into the Hydra schema as ``data``. Defaults live here and nowhere else.

Deliberately left out: model/tokenizer choice (the ``model`` group owns it) and the batch size
(the trainer owns it: ``trainer.batch_size``, ``trainer.micro_batch_size``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from alignkit.errors import ConfigError

FORMATS = ("auto", "sft", "paired", "unpaired", "listwise", "prompt", "stepwise")
COLUMN_PRESETS = ("trl", "openrlhf", "llamafactory", "nemo", "hh_rlhf", "ultrafeedback", "nectar", "orca",
                  "math_shepherd")  # layouts.py
CHAT_TEMPLATES = ("auto", "always", "never")
PROMPT_TRUNCATIONS = ("keep_end", "keep_start")
RESPONSE_TRUNCATIONS = ("truncate", "drop")
PAIR_EXPANSIONS = ("all_pairs", "best_vs_worst", "best_vs_rest", "adjacent")
ON_ERROR = ("raise", "skip")
LAYOUTS = ("padded", "packed", "prefix_shared")
TRAIN_ON = ("all_assistant", "last_assistant")
# held out of the user's own data.train when it is overridden without data.eval (data/overrides.py)
OWN_DATA_EVAL_FRACTION = 0.05


def check_choice(section: str, name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise ``ConfigError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ConfigError(
            f"{section}.{name}={value!r} is not a valid choice. Valid choices: {', '.join(choices)}. "
            f"Set it on the command line, e.g. {section}.{name}={choices[0]}."
        )


@dataclass
class SourceConfig:
    """One data source: a file (``.jsonl``, ``.jsonl.gz``, ``.parquet`` ...), a glob, a folder or a hub name.

    ``split`` and ``subset`` apply to folders and hub names (see ``alignkit/data/resolve.py``).
    """

    path: str = ""  # file, glob (data/*.jsonl), folder (train.parquet + test.parquet, data/train-*.parquet) or org/name
    weight: float = 1.0  # records drawn = round(weight * size): 0.5 = a seeded half, 2.0 = twice
    split: Optional[str] = None  # folder / hub split; None = "train" (or the only split); a lone file is "train"
    subset: Optional[str] = None  # load_dataset's name (a config such as gsm8k's "main"); None = the default
    format: Optional[str] = None  # None = DataConfig.format
    columns: Optional[str] = None  # column preset; None = DataConfig.columns
    column_map: dict[str, str] = field(default_factory=dict)  # canonical name -> column, over the preset

    def validate(self, section: str = "data.train[]") -> None:
        if not self.path:
            raise ConfigError(f"{section}.path is empty: give a file, a datasets folder or a hub name.")
        if self.weight <= 0:
            raise ConfigError(f"{section}.weight={self.weight} must be > 0.")
        if self.format is not None:
            check_choice(section, "format", self.format, FORMATS)
        if self.columns is not None:
            check_choice(section, "columns", self.columns, COLUMN_PRESETS)


@dataclass
class DataConfig:
    """The ``data`` config group."""

    train: list[SourceConfig] = field(default_factory=list)
    eval: list[SourceConfig] = field(default_factory=list)  # empty = split off eval_fraction of train
    eval_fraction: float = 0.0
    format: str = "auto"
    columns: str = "trl"  # column layout (alignkit/data/layouts.py): trl, openrlhf, llamafactory, hh_rlhf, ...
    column_map: dict[str, str] = field(default_factory=dict)  # canonical name -> column or path (a[].b), over it
    chat_template: str = "auto"  # plain-string data: auto = the tokenizer's template when it has one; always; never
    input_template: Optional[str] = None  # OpenRLHF's --input_template ("User: {}\nAssistant: "), untemplated text
    max_length: int = 1024  # prompt + one completion, in tokens
    max_prompt_length: int = 512
    prompt_truncation: str = "keep_end"
    response_truncation: str = "truncate"
    pair_expansion: str = "all_pairs"  # listwise data under a pairwise loss
    min_score_gap: float = 0.0  # pairs whose score gap is <= this are dropped (ties always dropped)
    label_threshold: Optional[float] = None  # scores -> labels: score >= threshold; None = above group mean
    on_error: str = "raise"
    layout: str = "padded"
    max_tokens_per_row: Optional[int] = None  # packing budget of packed / prefix_shared rows; None = longest unit
    train_on: str = "all_assistant"  # multi-turn SFT: which assistant turns are trained
    # stepwise data (runner=prm, data/stepwise.py): the text after each step, whose last token carries the step's
    # label (TRL's PRMConfig.step_separator); and TRL's train_on_last_step_only (training loss on the last step of
    # each completion only; held-out metrics still read every step)
    step_separator: str = "\n"
    train_on_last_step_only: bool = False
    max_records: Optional[int] = None  # cap per source after mixing (quick runs)
    cache_dir: Optional[str] = None  # None = no on-disk cache of tokenized data
    seed: int = 0

    def validate(self) -> None:
        for index, source in enumerate(self.train):
            source.validate(f"data.train[{index}]")
        for index, source in enumerate(self.eval):
            source.validate(f"data.eval[{index}]")
        check_choice("data", "format", self.format, FORMATS)
        check_choice("data", "columns", self.columns, COLUMN_PRESETS)
        check_choice("data", "prompt_truncation", self.prompt_truncation, PROMPT_TRUNCATIONS)
        check_choice("data", "response_truncation", self.response_truncation, RESPONSE_TRUNCATIONS)
        check_choice("data", "pair_expansion", self.pair_expansion, PAIR_EXPANSIONS)
        check_choice("data", "on_error", self.on_error, ON_ERROR)
        check_choice("data", "layout", self.layout, LAYOUTS)
        check_choice("data", "train_on", self.train_on, TRAIN_ON)
        check_choice("data", "chat_template", self.chat_template, CHAT_TEMPLATES)
        self._check_input_template()
        if not 0.0 <= self.eval_fraction < 1.0:
            raise ConfigError(f"data.eval_fraction={self.eval_fraction} must be in [0, 1).")
        if self.max_length <= 0 or self.max_prompt_length <= 0:
            raise ConfigError("data.max_length and data.max_prompt_length must be positive.")
        if self.max_prompt_length >= self.max_length:
            raise ConfigError(
                f"data.max_prompt_length={self.max_prompt_length} must be < data.max_length={self.max_length} "
                "so that every completion keeps at least one token."
            )
        if self.min_score_gap < 0:
            raise ConfigError(f"data.min_score_gap={self.min_score_gap} must be >= 0.")
        if self.max_records is not None and self.max_records <= 0:
            raise ConfigError(f"data.max_records={self.max_records} must be positive (or null for all records).")
        if self.max_tokens_per_row is not None and self.max_tokens_per_row <= 0:
            raise ConfigError(f"data.max_tokens_per_row={self.max_tokens_per_row} must be positive (or null).")

    def _check_input_template(self) -> None:
        if self.input_template is None:
            return
        import string

        try:
            fields = [f for _, f, _, _ in string.Formatter().parse(self.input_template) if f is not None]
        except ValueError as err:
            raise ConfigError(f"data.input_template={self.input_template!r} is not a format string ({err}).") from None
        if fields != [""]:
            raise ConfigError(f"data.input_template={self.input_template!r} must hold exactly one {{}} where the "
                              "prompt goes (OpenRLHF's --input_template), e.g. 'User: {}\\nAssistant: '.")
        if self.chat_template == "always":
            raise ConfigError("data.input_template and data.chat_template=always both shape the prompt; OpenRLHF "
                              "ignores --input_template under --apply_chat_template. Choose one: drop "
                              "data.input_template, or set data.chat_template=never (or auto).")

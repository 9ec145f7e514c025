"""Build the tiny tokenizer shipped in ``alignkit/assets/tiny_tokenizer/`` (run once, output committed).

A byte-level BPE (so every string round-trips through encode/decode) trained with the
``tokenizers`` library on a small built-in English + digits corpus, with ChatML special tokens and
a chat template like SmolLM2's (without its default system prompt, to keep tiny sequences short).
Deterministic: running it again writes the same files.

    python scripts/build_tiny_tokenizer.py [--out alignkit/assets/tiny_tokenizer] [--vocab-size 1024]

Deliberately left out: any download; the corpus is the text below and nothing else.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# ChatML, as SmolLM2-Instruct renders it, minus the default system message.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

ENGLISH = """
The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.
What is the capital of France? The capital of France is Paris. What is the capital of Germany? It is Berlin.
The capital of Italy is Rome, the capital of Spain is Madrid, and the capital of Japan is Tokyo.
You are a helpful assistant. Please answer the question briefly and truthfully.
I do not know the answer to that question, but I can try to help you find it.
Sure! Here is a short poem about the sea: the waves roll in, the waves roll out, the gulls are singing all about.
Water boils at one hundred degrees Celsius at sea level and freezes at zero degrees.
The sun rises in the east and sets in the west. There are seven days in a week and twelve months in a year.
Cats and dogs are common pets. Birds can fly, fish can swim, and people can walk, run and read books.
Thank you for your question. Let me think step by step before I give the final answer.
First, add the two numbers. Then multiply the result by three. Finally, subtract one.
The answer is correct. The answer is wrong. This response is more helpful than that one.
Write a story about a small robot who wants to learn how to paint pictures of the mountains.
Once upon a time there was a little village near a river, where the children played every day.
Summarize the following text in one sentence. Translate the sentence into simple English.
Good morning! How are you today? I am fine, thank you. Have a nice day and see you tomorrow.
Science helps us understand the world: physics, chemistry, biology and mathematics are its tools.
Computers process information using programs written by programmers in languages such as Python.
The model should be honest, harmless and helpful. It should refuse to help with dangerous requests.
Explain why the sky is blue. Sunlight is scattered by the air, and blue light is scattered the most.
Reading every day makes you a better writer. Practice, patience and curiosity are important.
The train leaves the station at nine o'clock and arrives in the city before noon.
She said that the weather would be warm and sunny, so we went to the park for a picnic.
Yes. No. Maybe. Always. Never. Sometimes. Because. However, therefore, although, unless.
"""


def digits_corpus() -> list[str]:
    """Arithmetic facts and number words, so digits and simple math tokenize compactly."""
    lines = [f"{a} + {b} = {a + b}. {a} * {b} = {a * b}." for a in range(0, 30, 3) for b in range(1, 12, 2)]
    lines += [f"The year {year} had 365 days; question {n}: answer {n * 7 % 10}." for n, year in enumerate(range(1990, 2030, 3))]
    lines.append("zero one two three four five six seven eight nine ten eleven twelve hundred thousand million")
    lines.append("0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000 3.14 2.5 -1 50% 1/2")
    return lines


def chat_corpus() -> list[str]:
    turns = [line.strip() for line in ENGLISH.strip().splitlines()]
    return [
        f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n" for q, a in zip(turns, turns[1:])
    ]


def build_tokenizer(vocab_size: int) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [line for line in ENGLISH.strip().splitlines()] + digits_corpus() + chat_corpus()
    tokenizer.train_from_iterator(corpus, trainer=trainer)
    return tokenizer


def save(tokenizer: Tokenizer, out_dir: Path) -> None:
    from transformers import PreTrainedTokenizerFast

    hf_tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token="<|endoftext|>",
        model_max_length=512,
        clean_up_tokenization_spaces=False,
    )
    hf_tokenizer.chat_template = CHAT_TEMPLATE
    out_dir.mkdir(parents=True, exist_ok=True)
    hf_tokenizer.save_pretrained(str(out_dir))
    # name the class that every transformers version knows (5.x writes its new backend name)
    config_path = out_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config.pop("backend", None)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    default_out = Path(__file__).resolve().parents[1] / "alignkit" / "assets" / "tiny_tokenizer"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=default_out)
    parser.add_argument("--vocab-size", type=int, default=1024)
    args = parser.parse_args()
    tokenizer = build_tokenizer(args.vocab_size)
    save(tokenizer, args.out)
    print(f"wrote {args.out} ({tokenizer.get_vocab_size()} tokens)")


if __name__ == "__main__":
    main()

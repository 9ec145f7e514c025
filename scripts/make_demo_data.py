"""Write the demo task's datasets to data/demo/: SFT, paired, unpaired, listwise and prompt-only.

The task family (data/demo/README.md): one-integer questions -- arithmetic (``+ - *``), one-step
word problems and copying a number from a stated fact -- each followed by the judge's instruction
``Answer with 'Answer: <number>' only.``. Candidate replies are built from templates (the ideal
``Answer: N``, a short equation, an explanation ending in the tag, rambling, wrong answers in each
style, a refusal, an echo of the question) and scored by ``alignkit.rewards.judge``, so every
preference in the files IS the judge's:

* paired: judge-best vs a strictly worse candidate (``score_chosen``/``score_rejected`` included);
* unpaired: one candidate, ``label`` = judge score >= ``DESIRABLE_THRESHOLD``;
* listwise: 4 distinct candidates with their judge ``scores`` (at least two different);
* sft: ``messages`` = the prompt and the ideal reply;
* prompts: ``prompt`` plus the reference ``answer`` (and the question ``task``) that the reward
  functions receive.

Prompts are chat messages, responses ``[{"role": "assistant", "content": ...}]`` (TRL's
conversational format); every file also carries ``answer``. Train and eval prompts are drawn from
one pool of distinct problems (``3 + 4`` and ``4 + 3`` count as one), so they never overlap.
Deterministic for a given ``--seed``; runs in about a second; no model needed.

Usage: ``python scripts/make_demo_data.py [--out data/demo] [--seed 0] [--train 1000] [--eval 200]``
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Callable

from alignkit.rewards.judge import INSTRUCTION, score

DESIRABLE_THRESHOLD = 1.25
NAMES = ["Tom", "Mia", "Sam", "Ana", "Leo", "Zoe", "Max", "Ivy", "Ben", "Eva", "Noah", "Lily"]
ITEMS = ["apples", "pens", "stickers", "marbles", "books", "cards", "shells", "coins", "eggs", "stamps"]
COLORS = ["red", "blue", "green", "yellow", "black", "white", "silver", "orange"]
THINGS = ["lamp", "kite", "mug", "scarf", "ticket", "puzzle", "clock", "bottle"]
FILLERS = [
    "Great question! Problems like this are a nice way to practice careful thinking, so let us read it again.",
    "Let me think about this step by step, because it is important to explain every part of the reasoning.",
    "Sure, I would be happy to help with this one. Questions like this appear in homework and in everyday life.",
]
REFUSALS = ["I'm sorry, I can't help with that question.", "I am not sure what you mean.", "That is a difficult question to answer."]


class Problem:
    """One question with its integer answer and the text of a worked explanation (for any claimed result)."""

    def __init__(self, task: str, key: tuple, question: str, answer: int, explain: Callable[[int], str], equation: Callable[[int], str]):
        self.task, self.key, self.question, self.answer = task, key, question, answer
        self.explain, self.equation = explain, equation

    @property
    def prompt(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{self.question} {INSTRUCTION}"}]


def _arithmetic(rng: random.Random) -> Problem:
    op = rng.choice("+-*")
    if op == "+":
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        n, key = a + b, ("+", min(a, b), max(a, b))
    elif op == "-":
        a = rng.randint(10, 99)
        b = rng.randint(1, a - 1)
        n, key = a - b, ("-", a, b)
    else:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        n, key = a * b, ("*", min(a, b), max(a, b))
    verb = {"+": "add the two numbers", "-": f"take {b} away from {a}", "*": f"add {a} to itself {b} times"}[op]
    return Problem("arithmetic", key, f"What is {a} {op} {b}?", n,
                   lambda r: f"To find {a} {op} {b}, {verb}: {a} {op} {b} = {r}.", lambda r: f"{a} {op} {b} = {r}")


def _word(rng: random.Random) -> Problem:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a = rng.randint(3, 30)
    if rng.random() < 0.5:
        b = rng.randint(2, 20)
        question = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?"
        n, op, verb = a + b, "+", f"gets {b} more, so we add"
    else:
        b = rng.randint(1, a - 1)
        question = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?"
        n, op, verb = a - b, "-", f"gives away {b}, so we subtract"
    return Problem("word", ("word", name, item, a, op, b), question, n,
                   lambda r: f"{name} starts with {a} {item} and {verb}: {a} {op} {b} = {r}.",
                   lambda r: f"{a} {op} {b} = {r}")


def _fact(rng: random.Random) -> Problem:
    n = rng.randint(2, 99)
    kind = rng.randrange(3)
    if kind == 0:
        color = rng.choice(COLORS)
        fact, question, claim = f"the {color} key opens door {n}.", f"Which door does the {color} key open?", f"the {color} key opens door {{}}"
    elif kind == 1:
        name = rng.choice(NAMES)
        fact, question, claim = f"{name} is {n} years old.", f"How old is {name}?", f"{name} is {{}} years old"
    else:
        thing = rng.choice(THINGS)
        fact, question, claim = f"the {thing} costs {n} dollars.", f"How many dollars does the {thing} cost?", f"the {thing} costs {{}} dollars"
    return Problem("fact", ("fact", fact), f"Fact: {fact} {question}", n,
                   lambda r: f"The fact states it directly: {claim.format(r)}.",
                   lambda r: f"{claim.format(r)[0].upper()}{claim.format(r)[1:]}.")


MAKERS = [_arithmetic, _arithmetic, _word, _fact]  # half arithmetic, a quarter word problems, a quarter facts


def problem_pool(rng: random.Random, size: int) -> list[Problem]:
    pool: dict[tuple, Problem] = {}
    while len(pool) < size:
        problem = rng.choice(MAKERS)(rng)
        pool.setdefault(problem.key, problem)
    return list(pool.values())


def _wrong(rng: random.Random, n: int) -> int:
    return n + rng.choice([-10, -3, -2, -1, 1, 2, 3, 10]) if n > 10 else n + rng.choice([1, 2, 3, 10])


def candidate(kind: str, p: Problem, rng: random.Random) -> str:
    """The reply of one template ``kind`` to problem ``p``."""
    w = _wrong(rng, p.answer)
    filler = rng.choice(FILLERS)
    texts = {
        "ideal": lambda: f"Answer: {p.answer}",
        "short_correct": lambda: p.equation(p.answer),
        "tagged_verbose": lambda: f"{p.explain(p.answer)}\nAnswer: {p.answer}",
        "rambling_correct": lambda: f"{filler}\n\n{p.explain(p.answer)} I hope this helps!",
        "wrong_tagged": lambda: f"Answer: {w}",
        "wrong_short": lambda: p.equation(w),
        "wrong_tagged_verbose": lambda: f"{p.explain(w)}\nAnswer: {w}",
        "wrong_rambling": lambda: f"{filler}\n\n{p.explain(w)} I hope this helps!",
        "refusal": lambda: rng.choice(REFUSALS),
        "echo": lambda: p.question,
    }
    return texts[kind]()


GOOD = {"ideal": 0.6, "tagged_verbose": 0.2, "short_correct": 0.2}
REJECTED = {"short_correct": 0.15, "tagged_verbose": 0.10, "rambling_correct": 0.15, "wrong_tagged": 0.12,
            "wrong_short": 0.13, "wrong_tagged_verbose": 0.08, "wrong_rambling": 0.12, "refusal": 0.08, "echo": 0.07}
BAD = {kind: w for kind, w in REJECTED.items() if kind not in GOOD}
KINDS = ["ideal", *REJECTED]


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _judged(kind: str, p: Problem, rng: random.Random) -> tuple[str, float]:
    text = candidate(kind, p, rng)
    return text, score(text, p.answer).total


def _reply(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def sft_row(p: Problem, rng: random.Random) -> dict:
    return {"messages": p.prompt + _reply(f"Answer: {p.answer}"), "answer": str(p.answer)}


def prompt_row(p: Problem, rng: random.Random) -> dict:
    return {"prompt": p.prompt, "answer": str(p.answer), "task": p.task}


def paired_row(p: Problem, rng: random.Random) -> dict:
    chosen_kind = "ideal" if rng.random() < 0.85 else rng.choice(["tagged_verbose", "short_correct"])
    chosen, best = _judged(chosen_kind, p, rng)
    while True:
        rejected, worse = _judged(_pick(rng, REJECTED), p, rng)
        if worse < best:
            break
    return {"prompt": p.prompt, "chosen": _reply(chosen), "rejected": _reply(rejected),
            "score_chosen": best, "score_rejected": worse, "answer": str(p.answer)}


def unpaired_row(p: Problem, rng: random.Random) -> dict:
    kind = _pick(rng, GOOD) if rng.random() < 0.5 else _pick(rng, BAD)
    text, value = _judged(kind, p, rng)
    return {"prompt": p.prompt, "completion": _reply(text), "label": value >= DESIRABLE_THRESHOLD, "answer": str(p.answer)}


def listwise_row(p: Problem, rng: random.Random) -> dict:
    while True:
        judged = [_judged(kind, p, rng) for kind in rng.sample(KINDS, 4)]
        if len({value for _, value in judged}) > 1:
            break
    return {"prompt": p.prompt, "responses": [_reply(t) for t, _ in judged], "scores": [v for _, v in judged],
            "answer": str(p.answer)}


ROWS = {"sft": sft_row, "paired": paired_row, "unpaired": unpaired_row, "listwise": listwise_row, "prompts": prompt_row}


def build(seed: int = 0, n_train: int = 1000, n_eval: int = 200) -> dict[str, list[dict]]:
    """Every file's rows, keyed ``<format>_<split>``; a pure function of the arguments."""
    rng = random.Random(seed)
    pool = problem_pool(rng, n_train + n_eval)
    rng.shuffle(pool)
    splits = {"train": pool[:n_train], "eval": pool[n_train:]}
    out = {}
    for fmt, make in ROWS.items():
        for split, problems in splits.items():
            file_rng = random.Random(f"{seed}:{fmt}:{split}")
            out[f"{fmt}_{split}"] = [make(p, file_rng) for p in problems]
    return out


def write(out_dir: Path, files: dict[str, list[dict]]) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, rows in files.items():
        tmp = out_dir / f".{name}.jsonl.tmp"
        tmp.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        tmp.replace(out_dir / f"{name}.jsonl")
        print(f"{out_dir / name}.jsonl: {len(rows)} rows")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "data" / "demo")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train", type=int, default=1000)
    parser.add_argument("--eval", type=int, default=200)
    args = parser.parse_args()
    write(args.out, build(args.seed, args.train, args.eval))


if __name__ == "__main__":
    main()

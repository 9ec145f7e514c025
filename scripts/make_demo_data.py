"""Write the demo task's datasets to data/demo/: SFT, paired, unpaired, scalar, listwise, stepwise and prompt-only.

The task (data/demo/README.md): *look a number up among similar facts*. Each prompt states 3 or 4
facts of one kind (``The red key opens door 20. The blue key opens door 47. ...``, people's ages,
prices, points scored), all numbers distinct two-digit integers, then asks about one of them at a
uniformly drawn position, followed by the judge's instruction (``INSTRUCTION``). The ideal reply
quotes the fact it uses, then the tagged answer: ``The blue key opens door 47. Answer: 47``.
SmolLM2-135M-Instruct gets about 4 in 10 right before training: it copies *a* fact, often the
last one or the first one instead of the one asked about (measured, see the README).

Candidate replies come from templates and are scored by ``alignkit.rewards.judge``, so every
preference in the files IS the judge's:

* correct: the ideal reply; a bare ``Answer: N``; the quoted fact without the tag;
* wrong: the asked entity with a distractor's number (in the ideal format: the model's own error),
  another fact quoted, a bare wrong ``Answer: N``, a number that is in no fact, a refusal.

Files: paired (chosen is always a correct reply, rejected always a wrong one, so every pair teaches
which number is right, not which format), unpaired (``label`` = the reply is correct), scalar (one
reply, correct or wrong with equal odds as in unpaired, and its judge ``score`` as a scalar reward:
DRO's data), listwise (4
distinct candidates with their judge ``scores``), stepwise (a reply as two steps, the quoted fact and the
``Answer: N`` tag, each labelled: the fact is right when it is the asked entity's fact with its number, the
answer when it is the right number; kinds ideal [T, T], right fact then a slip [T, F], the asked entity
with a wrong number [F, F], another fact [F, F]: a process reward model's data, ``runner=prm``), sft (the
ideal reply), prompts (``prompt`` plus
the reference ``answer``, the fact ``task`` kind, ``facts`` and the asked ``position``).

Prompts are chat messages, responses ``[{"role": "assistant", "content": ...}]`` (TRL's
conversational format); every file also carries ``answer``. Train and eval problems are drawn
from one pool of distinct problems and no eval problem's asked fact (kind, entity, number) appears
in any train prompt, so a held-out question cannot be answered from memory of training.
Deterministic for a given ``--seed``; runs in about a second; no model needed.

Usage: ``python scripts/make_demo_data.py [--out data/demo] [--seed 0] [--train 1000] [--eval 300]``
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from alignkit.rewards.judge import INSTRUCTION, score

DESIRABLE_THRESHOLD = 1.0  # unpaired label: judge score >= 1.0, i.e. the answer is right
FACT_COUNTS = (3, 4)
NUMBERS = range(10, 100)

# kind -> (entities, fact template, question template); {e} the entity, {n} the number
KINDS: dict[str, tuple[list[str], str, str]] = {
    "keys": (["red", "blue", "green", "yellow", "black", "white", "silver", "orange", "purple", "brown"],
             "The {e} key opens door {n}.", "Which door does the {e} key open?"),
    "ages": (["Tom", "Mia", "Sam", "Ana", "Leo", "Zoe", "Max", "Ivy", "Ben", "Eva", "Noah", "Lily"],
             "{e} is {n} years old.", "How old is {e}?"),
    "prices": (["lamp", "kite", "mug", "scarf", "ticket", "puzzle", "clock", "bottle", "chair", "radio"],
               "The {e} costs {n} dollars.", "How many dollars does the {e} cost?"),
    "points": (["Tom", "Mia", "Sam", "Ana", "Leo", "Zoe", "Max", "Ivy", "Ben", "Eva", "Noah", "Lily"],
               "{e} scored {n} points.", "How many points did {e} score?"),
}
REFUSALS = ["I'm sorry, I can't answer that.", "I am not sure which one you mean.", "The facts do not say."]


class Problem:
    """A set of facts of one kind and a question about the fact at ``position``."""

    def __init__(self, kind: str, facts: list[tuple[str, int]], position: int):
        self.kind, self.facts, self.position = kind, facts, position
        _, self.fact_template, self.question_template = KINDS[kind]
        self.entity, self.answer = facts[position]

    @property
    def key(self) -> tuple:
        return (self.kind, tuple(self.facts), self.position)

    @property
    def asked(self) -> tuple:
        """The asked fact: no eval problem's asked fact occurs in any train prompt."""
        return (self.kind, self.entity, self.answer)

    def fact(self, entity: str, number: int) -> str:
        return self.fact_template.format(e=entity, n=number)

    @property
    def question(self) -> str:
        facts = " ".join(self.fact(e, n) for e, n in self.facts)
        return f"{facts} {self.question_template.format(e=self.entity)}"

    @property
    def prompt(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"{self.question} {INSTRUCTION}"}]


def make_problem(rng: random.Random) -> Problem:
    kind = rng.choice(sorted(KINDS))
    entities = rng.sample(KINDS[kind][0], rng.choice(FACT_COUNTS))
    numbers = rng.sample(NUMBERS, len(entities))
    return Problem(kind, list(zip(entities, numbers)), rng.randrange(len(entities)))


def problem_pools(rng: random.Random, n_train: int, n_eval: int) -> tuple[list[Problem], list[Problem]]:
    """Distinct train and eval problems; no eval problem's asked fact is stated in any train prompt."""
    eval_pool: dict[tuple, Problem] = {}
    while len(eval_pool) < n_eval:
        p = make_problem(rng)
        eval_pool.setdefault(p.key, p)
    held_out = {p.asked for p in eval_pool.values()}
    train_pool: dict[tuple, Problem] = {}
    while len(train_pool) < n_train:
        p = make_problem(rng)
        if p.key not in eval_pool and not any((p.kind, e, n) in held_out for e, n in p.facts):
            train_pool.setdefault(p.key, p)
    return list(train_pool.values()), list(eval_pool.values())


def _distractor(p: Problem, rng: random.Random) -> tuple[str, int]:
    return rng.choice([f for i, f in enumerate(p.facts) if i != p.position])


def _absent_number(p: Problem, rng: random.Random) -> int:
    used = {n for _, n in p.facts}
    return rng.choice([n for n in NUMBERS if n not in used and abs(n - p.answer) <= 10])


def candidate(kind: str, p: Problem, rng: random.Random) -> str:
    """The reply of one template ``kind`` to problem ``p``."""
    if kind == "ideal":
        return f"{p.fact(p.entity, p.answer)} Answer: {p.answer}"
    if kind == "bare_correct":
        return f"Answer: {p.answer}"
    if kind == "quote_correct":
        return p.fact(p.entity, p.answer)
    if kind == "wrong_number":  # the asked entity with a distractor's number: the base model's own mistake
        _, n = _distractor(p, rng)
        return f"{p.fact(p.entity, n)} Answer: {n}"
    if kind == "wrong_fact":  # another fact quoted and answered
        e, n = _distractor(p, rng)
        return f"{p.fact(e, n)} Answer: {n}"
    if kind == "wrong_bare":
        return f"Answer: {_distractor(p, rng)[1]}"
    if kind == "wrong_absent":
        n = _absent_number(p, rng)
        return f"{p.fact(p.entity, n)} Answer: {n}"
    if kind == "refusal":
        return rng.choice(REFUSALS)
    raise KeyError(kind)


CORRECT = {"ideal": 0.8, "bare_correct": 0.1, "quote_correct": 0.1}
WRONG = {"wrong_number": 0.45, "wrong_fact": 0.2, "wrong_bare": 0.15, "wrong_absent": 0.15, "refusal": 0.05}
ALL_KINDS = [*CORRECT, *WRONG]


def _pick(rng: random.Random, weights: dict[str, float]) -> str:
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def _judged(kind: str, p: Problem, rng: random.Random) -> tuple[str, float]:
    text = candidate(kind, p, rng)
    return text, score(text, p.answer).total


def _reply(text: str) -> list[dict[str, str]]:
    return [{"role": "assistant", "content": text}]


def sft_row(p: Problem, rng: random.Random) -> dict:
    return {"messages": p.prompt + _reply(candidate("ideal", p, rng)), "answer": str(p.answer)}


def prompt_row(p: Problem, rng: random.Random) -> dict:
    return {"prompt": p.prompt, "answer": str(p.answer), "task": p.kind, "facts": len(p.facts), "position": p.position}


def paired_row(p: Problem, rng: random.Random) -> dict:
    chosen, best = _judged(_pick(rng, CORRECT), p, rng)
    rejected, worse = _judged(_pick(rng, WRONG), p, rng)
    return {"prompt": p.prompt, "chosen": _reply(chosen), "rejected": _reply(rejected),
            "score_chosen": best, "score_rejected": worse, "answer": str(p.answer)}


def unpaired_row(p: Problem, rng: random.Random) -> dict:
    text, value = _judged(_pick(rng, CORRECT) if rng.random() < 0.5 else _pick(rng, WRONG), p, rng)
    return {"prompt": p.prompt, "completion": _reply(text), "label": value >= DESIRABLE_THRESHOLD, "answer": str(p.answer)}


def scalar_row(p: Problem, rng: random.Random) -> dict:
    text, value = _judged(_pick(rng, CORRECT) if rng.random() < 0.5 else _pick(rng, WRONG), p, rng)
    return {"prompt": p.prompt, "completion": _reply(text), "score": value, "answer": str(p.answer)}


def listwise_row(p: Problem, rng: random.Random) -> dict:
    kinds = [_pick(rng, CORRECT), *rng.sample(list(WRONG), 3)]  # one correct reply, three wrong ones
    rng.shuffle(kinds)
    judged = [_judged(kind, p, rng) for kind in kinds]
    return {"prompt": p.prompt, "responses": [_reply(t) for t, _ in judged], "scores": [v for _, v in judged],
            "answer": str(p.answer)}


STEP_KINDS = {"ideal": 0.4, "slip": 0.2, "wrong_number": 0.2, "wrong_fact": 0.2}


def stepwise_row(p: Problem, rng: random.Random) -> dict:
    """TRL's stepwise columns: the reply's steps (quoted fact, answer tag) and whether each is right."""
    kind = _pick(rng, STEP_KINDS)
    entity, number = p.entity, p.answer
    if kind == "wrong_number":
        number = _distractor(p, rng)[1]
    elif kind == "wrong_fact":
        entity, number = _distractor(p, rng)
    answer = _distractor(p, rng)[1] if kind == "slip" else number
    steps = [p.fact(entity, number), f"Answer: {answer}"]
    labels = [entity == p.entity and number == p.answer, answer == p.answer]
    return {"prompt": p.prompt, "completions": steps, "labels": labels, "answer": str(p.answer)}


ROWS = {"sft": sft_row, "paired": paired_row, "unpaired": unpaired_row, "scalar": scalar_row, "listwise": listwise_row,
        "prompts": prompt_row, "stepwise": stepwise_row}


def build(seed: int = 0, n_train: int = 1000, n_eval: int = 300) -> dict[str, list[dict]]:
    """Every file's rows, keyed ``<format>_<split>``; a pure function of the arguments."""
    rng = random.Random(seed)
    train, held_out = problem_pools(rng, n_train, n_eval)
    splits = {"train": train, "eval": held_out}
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
    parser.add_argument("--eval", type=int, default=300)
    args = parser.parse_args()
    write(args.out, build(args.seed, args.train, args.eval))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""A demo PRM's first-step accuracy by kind of quoted fact, and its scores of a policy's replies by the same kinds.

    python scripts/prm_kinds.py --prm RUN/final [--n 200] [--samples OTHER_RUN/eval/samples.jsonl]

The demo's stepwise rows (``data/demo/stepwise_eval.jsonl``, ``scripts/make_demo_data.py``'s ``stepwise_row``) start
with a quoted fact of one of three kinds, read from the text: ``right`` (the label says so), ``other_fact`` (a
wrong quote that is a sentence of the prompt: another entity's fact) and ``wrong_number`` (a wrong quote that is
not in the prompt: the asked entity with another number). For each kind it prints how often the PRM's
P(correct) >= 0.5 agrees with the label, and the mean P(correct). With ``--samples`` (an ``answer_eval.py``
samples file, the first ``--n`` held-out prompts of ``prompts_eval.jsonl`` in order) it scores each trained
model's reply as GRPO's ``reward.prm`` would (the first step's P(correct)) and groups the replies as right
(the answer appears in it), a wrong sentence of the prompt, or a wrong sentence not in the prompt -- where a
policy trained on the PRM has gone. Left out: anything beyond the demo task's two-step replies.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))


def fact_kind(prompt_text: str, quote: str, right: bool) -> str:
    """``right``, ``other_fact`` (a wrong sentence of the prompt) or ``wrong_number`` (a wrong one not in it)."""
    if right:
        return "right"
    return "other_fact" if quote.strip() in prompt_text else "wrong_number"


def reply_kind(prompt_text: str, reply: str, answer: str) -> str:
    """A policy's reply: ``right`` (the answer's number appears), else where its text comes from."""
    if answer in re.findall(r"-?\d+", reply):
        return "right"
    if not reply.strip():
        return "empty"
    return "other_fact" if reply.strip() in prompt_text else "wrong_number"


def summarise(kinds: list[str], probs: list[float], labels: list[bool] | None = None) -> dict:
    """Per kind: count, mean P(correct) and (with labels) the share where P >= 0.5 agrees with the label."""
    out: dict = defaultdict(lambda: {"n": 0, "p": 0.0, "agree": 0})
    for i, (kind, p) in enumerate(zip(kinds, probs)):
        out[kind]["n"] += 1
        out[kind]["p"] += p
        if labels is not None:
            out[kind]["agree"] += (p >= 0.5) == labels[i]
    return {k: {"n": v["n"], "mean_p": v["p"] / v["n"], **({"accuracy": v["agree"] / v["n"]} if labels is not None
                                                             else {})} for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prm", required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--samples", type=Path, default=None)
    args = parser.parse_args()
    from judge_eval import demo_prm

    prm = demo_prm(args.prm)
    rows = [json.loads(line) for line in (ROOT / "data/demo/stepwise_eval.jsonl").read_text().splitlines()][: args.n]
    probs = prm.step_probs([r["prompt"] for r in rows], ["\n".join(r["completions"]) for r in rows])
    kinds = [fact_kind(r["prompt"][-1]["content"], r["completions"][0], r["labels"][0]) for r in rows]
    report = {"first_step": summarise(kinds, [p[0] for p in probs], [r["labels"][0] for r in rows])}
    if args.samples:
        prompts = [json.loads(line) for line in (ROOT / "data/demo/prompts_eval.jsonl").read_text().splitlines()]
        samples = [json.loads(line) for line in args.samples.read_text().splitlines()][: args.n]
        replies = [s["model"] for s in samples]
        scored = prm.step_probs([p["prompt"] for p in prompts[: len(replies)]], replies)
        kinds = [reply_kind(p["prompt"][-1]["content"], reply, str(p["answer"])) for p, reply in zip(prompts, replies)]
        report["policy_replies"] = summarise(kinds, [s[0] if s else 0.0 for s in scored])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

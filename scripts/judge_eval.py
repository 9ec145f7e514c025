#!/usr/bin/env python
"""Best-of-K by a judge: does the judge pick right answers? Held-out answer accuracy with 95% intervals.

    python scripts/judge_eval.py --policy MODEL --judge-kind pairwise --judge-path RUN/final [--k 4] [--n 200]
        [--out DIR] [--samples DIR/samples.jsonl]
    python scripts/judge_eval.py --samples DIR/samples.jsonl --judge-kind prm --judge-path PRM_RUN/final
        [--prm-aggregate min|prod|last]

For the first ``n`` held-out demo prompts (``data/demo/prompts_eval.jsonl``) the policy samples ``k`` replies
each (temperature ``--temperature``, the library's generation engine, seed 0); the judge
(``alignkit.rl.judges``: ``pairwise`` = a ``recipe=pm_*`` folder, ``reward_model`` = ``rm_*``, ``llm`` = a causal
LM asked A or B, ``rule`` = the demo's reward functions) compares every pair of a prompt's replies and the
reply with the highest mean win probability is picked (``judges.win_rates``, as online DPO ranks; ties go to
the earlier sample). ``prm`` is pointwise: a ``recipe=prm_*`` folder scores each reply alone
(``alignkit.rewards.process``, the reward GRPO reads with ``reward.prm``: steps at the separator it was trained
with, each step's P(correct), aggregated by ``--prm-aggregate``) and the highest score is picked -- the PRM as
a verifier (best-of-N, Lightman et al. 2023). The PRM sees the prompt as its training data had it: the
record's messages through the chat template (``extra.prompt`` of samples.jsonl; a samples file without it:
the prompt text as one user turn). Every reply is scored with the same parser as ``answer_eval.py``
(``alignkit.rewards.judge.accuracy_score``). Written to ``--out``/judge_summary_<kind>.json and printed:

* the picked replies' answer accuracy (Wilson 95% interval), against the *first* sample's (a pick without a
  judge, the same replies) with Newcombe's paired interval for the difference;
* the mean accuracy over all samples (a random pick's expectation) and the oracle (any sample right), the
  ceiling a judge can reach on these samples; the share of prompts where the judge had a right answer to pick
  and picked one.

``--samples`` reuses an earlier run's samples.jsonl (the same prompts, k and policy), so several judges are
compared on the same replies. Left out: anything not on the demo task; a judge's own calibration.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

from answer_eval import EVAL_MAX_NEW_TOKENS, held_out_engine, paired_difference, wilson  # noqa: E402


def sample(policy: str, n: int, k: int, temperature: float) -> list[dict]:
    """``k`` sampled replies of ``policy`` to each of the first ``n`` held-out prompts."""
    import torch

    from alignkit.data.batch import decode_prompt

    engine, tokenizer, prompts = held_out_engine(policy, n)
    rows = []
    with torch.no_grad():
        for i in range(0, len(prompts), 8):
            chunk = prompts[i : i + 8]
            rollouts = engine.generate([p.prompt_ids for p in chunk], num_samples=k, max_new_tokens=EVAL_MAX_NEW_TOKENS,
                                       temperature=temperature, seed=i)
            for j, p in enumerate(chunk):
                mine = [r for r in rollouts if r.prompt_index == j]
                rows.append({"prompt": decode_prompt(p, tokenizer), "answer": p.extra.get("answer"),
                             "extra": {key: v for key, v in p.extra.items() if isinstance(v, (str, int, float, list))},
                             "replies": [tokenizer.decode(r.completion_ids, skip_special_tokens=True) for r in mine]})
    return rows


def demo_prm(path: str, aggregate: str = "min"):
    """A ``recipe=prm_*`` folder as GRPO's ``reward.prm`` loads it on the SmolLM2 demo presets."""
    from alignkit.config.compose import compose
    from alignkit.rewards.process import load_process_reward
    from alignkit.trainers.common import typed_run

    run = typed_run(compose(["recipe=grpo_smollm2"]))
    return load_process_reward(path, run.model, run.data, run.deepspeed, how=aggregate)


def per_row(rows: list[dict], flat: list[float]) -> list[list[float]]:
    """One flat score per reply, in row order, back into one list per row."""
    out, offset = [], 0
    for row in rows:
        out.append(flat[offset : offset + len(row["replies"])])
        offset += len(row["replies"])
    return out


def prm_scores(rows: list[dict], path: str | None, aggregate: str = "min") -> list[list[float]]:
    """Each reply's process-reward score (``alignkit.rewards.process``), the prompt as the record has it."""
    if not path:
        raise SystemExit("--judge-kind prm needs --judge-path: a recipe=prm_* run's final/ folder")
    prm = demo_prm(path, aggregate)
    # the prompt as the data has it (the record's messages, kept in "extra"), as GRPO's reward.prm reads it
    prompts = [r.get("extra", {}).get("prompt") or [{"role": "user", "content": r["prompt"]}]
               for r in rows for _ in r["replies"]]
    return per_row(rows, prm(prompts, [reply for r in rows for reply in r["replies"]]))


def pick(rows: list[dict], kind: str, path: str | None, aggregate: str = "min") -> list[list[float]]:
    """Each prompt's replies' mean win probability under the judge (``judges.text_win_rates``: all pairs, as
    online DPO ranks its samples); for ``prm`` each reply's process-reward score."""
    from alignkit.config.compose import compose
    from alignkit.rl import judges
    from alignkit.trainers.common import typed_run

    if kind == "prm":
        return prm_scores(rows, path, aggregate)
    overrides = ["recipe=online_dpo_smollm2", f"judge.kind={kind}"] + ([f"judge.path={path}"] if path else [])
    judge = judges.build_judge(typed_run(compose(overrides)))
    return per_row(rows, judges.text_win_rates(judge, [r["prompt"] for r in rows], [r["replies"] for r in rows],
                                               [r["extra"] for r in rows]).tolist())


def summarise(rows: list[dict], rates: list[list[float]]) -> dict:
    from alignkit.rewards.judge import accuracy_score

    right = [[bool(accuracy_score(reply, r["answer"])) for reply in r["replies"]] for r in rows]
    picked = [max(range(len(rs)), key=lambda j: (rs[j], -j)) for rs in rates]
    chosen = [ok[j] for ok, j in zip(right, picked)]
    first = [ok[0] for ok in right]
    n = len(rows)

    def rate(values: list[bool]) -> dict:
        k = sum(values)
        low, high = wilson(k, n)
        return {"accuracy": k / n, "low": low, "high": high}

    could = [i for i, ok in enumerate(right) if any(ok) and not all(ok)]
    return {"n": n, "k": len(rows[0]["replies"]) if rows else 0, "picked": rate(chosen), "first_sample": rate(first),
            "paired_picked_vs_first": paired_difference(chosen, first),
            "mean_sample_accuracy": sum(sum(ok) / len(ok) for ok in right) / n, "oracle": rate([any(ok) for ok in right]),
            "mixed_prompts": len(could), "right_picked_on_mixed": sum(chosen[i] for i in could) / max(len(could), 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", help="the model whose samples are judged (e.g. the SmolLM2 folder)")
    parser.add_argument("--judge-kind", required=True, choices=["rule", "reward_model", "pairwise", "llm", "prm"])
    parser.add_argument("--prm-aggregate", default="min", choices=["min", "prod", "last"])
    parser.add_argument("--judge-path", default=None)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--samples", type=Path, default=None, help="reuse this samples.jsonl instead of sampling")
    parser.add_argument("--out", type=Path, default=Path("judge-eval"))
    args = parser.parse_args()
    if args.samples:
        rows = [json.loads(line) for line in args.samples.read_text().splitlines()]
    elif args.policy:
        rows = sample(args.policy, args.n, args.k, args.temperature)
    else:
        parser.error("give --policy MODEL (to sample) or --samples FILE")
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.samples:
        (args.out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rates = pick(rows, args.judge_kind, args.judge_path, args.prm_aggregate)
    name = args.judge_kind + (f"_{args.prm_aggregate}" if args.judge_kind == "prm" else "")
    summary = {"judge": {"kind": args.judge_kind, "path": args.judge_path, **({"aggregate": args.prm_aggregate}
               if args.judge_kind == "prm" else {})}, **summarise(rows, rates)}
    (args.out / f"judge_summary_{name}.json").write_text(json.dumps(summary, indent=1))
    p, f, d = summary["picked"], summary["first_sample"], summary["paired_picked_vs_first"]
    print(f"judge {args.judge_kind} {args.judge_path or ''}: best of {summary['k']} on N={summary['n']} held-out prompts: "
          f"picked {p['accuracy']:.3f} [{p['low']:.3f}, {p['high']:.3f}] vs first sample {f['accuracy']:.3f} "
          f"[{f['low']:.3f}, {f['high']:.3f}]: {d['difference'] * 100:+.1f} points "
          f"[{d['difference_low'] * 100:+.1f}, {d['difference_high'] * 100:+.1f}]; mean sample "
          f"{summary['mean_sample_accuracy']:.3f}, oracle {summary['oracle']['accuracy']:.3f}; "
          f"on the {summary['mixed_prompts']} prompts with right and wrong replies the judge picked a right one "
          f"{summary['right_picked_on_mixed']:.3f}")


if __name__ == "__main__":
    main()

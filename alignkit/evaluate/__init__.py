"""``alignkit eval``: a run (or any model) scored on the run's own held-out data, with 95% intervals.

What is evaluated, and on what:

* ``alignkit eval RUN_DIR`` -- the run's ``final/`` model (a folder inside a run, e.g. a
  checkpoint export, works too) against the run's starting model, on the run's held-out data as
  its frozen ``config.yaml`` rebuilds it: ``data.eval`` sources, else the seeded
  ``data.eval_fraction`` of ``data.train`` (the same split training held out). A run without an
  eval set is refused with the overrides that give one; it is never scored on the demo task
  unless it trained on it.
* ``alignkit eval MODEL data=FILE`` -- any transformers folder (or a hub name, or ``tiny``); it
  needs data (``data=FILE``: every record of FILE, a path/glob/folder/hub name; or
  ``data.train=...``/``data.eval=...`` as in training; or a ``recipe=...``), and says so without
  it. The baseline is ``--baseline`` (none without it: the model's rates alone).
* ``data=FILE`` on a run evaluates on FILE instead; ``reward.fns=[...]`` replaces the reward
  functions; any other ``key=value`` goes into the config as in training. A run's ``config.yaml``
  naming reward code outside alignkit (``mod:fn``, ``file.py:fn``) is not imported unless
  ``reward.fns=[...]`` is given on the command line (a copied run directory may have been edited;
  nothing read from disk executes code). ``eval/`` and its files are never written through a link.

What it measures (each with N and a 95% interval, ``alignkit.stats``):

* **answer accuracy** first -- the share of prompts whose greedy reply's final answer equals the
  record's reference (``answer`` / ``reward_model.ground_truth`` / ``ground_truth`` / ``solution``
  column; ``alignkit.rewards.answer`` reads both sides with the same parser), Wilson intervals; and
  the model-minus-baseline difference on the same prompts with Newcombe's paired interval
  (method 10). Records without a reference are left out of N (and counted).
* every reward function's mean (the run's ``reward.fns`` with their ``reward.options``, as the
  trainers build them; with the demo ``judge`` also its ``format`` and ``concise`` parts beside it),
  model and baseline, and the paired difference: a
  0/1 reward as a proportion (Wilson, Newcombe's paired difference), any other with the normal
  interval of the mean (of the per-prompt differences); the win rate of the model's total reward
  over the baseline's (ties 1/2),
  a mean with a normal interval clipped to [0, 1].
* preference accuracy on held-out pairs (paired/listwise/unpaired data): the share whose implicit
  reward ``(log p(chosen) - log p_ref(chosen)) - (log p(rejected) - log p_ref(rejected))`` is
  positive, the reference being the baseline (as DPO's reward is defined), and the likelihood
  accuracy ``log p(chosen) > log p(rejected)``; Wilson intervals.

A reward function that cannot score the data (a demo judge on data without ``answer``) is an error
when the user named it or the run trained on it (RL runs); for an offline run's default it is
left out with a printed note. Duplicate prompts are scored once (counted). The model and the
baseline run on the GPU when ``torch.cuda.is_available()``. Greedy replies go to ``samples.jsonl``;
everything to ``eval.json`` (``metrics``: ``{name: {n, rate, ci_low, ci_high}}``; the plain
values also at the top level, as before). One process, plain PyTorch, no DeepSpeed engine.
Left out: sampling-based (pass@k) accuracy, reward-model accuracy of ``rm`` runs (their eval
metrics are in ``metrics.jsonl``).

The package, by concern: ``target`` (what is evaluated on which data), ``scoring`` (reward functions,
greedy replies), ``measures`` (the rates and their intervals), ``command`` (``run_eval``, the table).
"""

from __future__ import annotations

from alignkit.evaluate.command import format_table, run_eval
from alignkit.evaluate.measures import answer_metrics, preference_accuracy
from alignkit.evaluate.scoring import build_scoring, generate
from alignkit.evaluate.target import EvalTarget, resolve_target

__all__ = ["EvalTarget", "answer_metrics", "build_scoring", "format_table", "generate", "preference_accuracy",
           "resolve_target", "run_eval"]

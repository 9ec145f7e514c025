"""One command for a maintainer with one GPU: does alignkit work on CUDA? One PASS/FAIL line per check.

    bash scripts/gpu_check.sh            # on the GPU machine, < 8 minutes (SmolLM2-135M, bf16, DeepSpeed ZeRO-2)
    bash scripts/gpu_check.sh --dry-run  # the same checks on the CPU with the tiny model (the test suite runs this)

Checks, each in its own run directory under ``--out`` (default: a temporary folder):

* ``env``        CUDA visible, bf16 supported (dry run: the CPU accelerator);
* ``sft``        ``alignkit train recipe=sft_smollm2`` for a few bf16 steps through DeepSpeed, finite losses;
* ``dpo``        the same with ``recipe=dpo_smollm2`` (precomputed reference);
* ``grpo``       the same with ``recipe=grpo_smollm2`` (generation on the GPU, judge rewards);
* ``logps``      packed and prefix-shared rows give the padded rows' per-token log-probs on the
                 device (fp32: 1e-4; bf16: 5e-2 absolute, the rounding of a 4D-mask SDPA vs a padded one);
* ``export``     the SFT run's exported ``final/`` folder reloads with ``from_pretrained`` on the
                 device and reproduces the trained model's log-probs;
* ``vllm_grpo``  GRPO steps with ``generation.engine=vllm`` (weights pushed into a colocated vLLM engine
                 after each optimizer step), run with the interpreter of ``.venv-vllm`` made by
                 ``ALIGNKIT_VLLM=cuda bash scripts/setup_vllm.sh`` (or the current one if it imports vllm);
                 SKIP, not FAIL, when vLLM is installed in neither (it is an optional extra).

Exit status: 0 when every check passed or was skipped, 1 otherwise. A check that cannot run (e.g. no GPU) fails
with its reason. Left out: multi-GPU collectives (``alignkit train -g 2`` on a 2-GPU machine
covers them) and throughput numbers (``scripts/bench*``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

class Skip(Exception):
    """A check that cannot apply here (an optional extra not installed): a SKIP line, not a failure."""


DIST_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, fp32: check the script itself")
    parser.add_argument("--out", default=None, help="folder for the runs (default: a temporary folder)")
    parser.add_argument("--only", default=None, help="comma-separated subset of the checks")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per training check")
    return parser.parse_args(argv)


class Checks:
    def __init__(self, args: argparse.Namespace, out: Path):
        self.args, self.out = args, out
        self.dry = bool(args.dry_run)
        self.model = "tiny" if self.dry else "smollm2"
        self.device = "cpu" if self.dry else "cuda"

    # ------------------------------------------------------------------ helpers
    def train(self, name: str, recipe: str, *extra: str, python: str = sys.executable) -> Path:
        """Run ``alignkit train`` in a child process; return its run directory (raises on failure)."""
        run_dir = self.out / name
        overrides = [f"recipe={recipe}_{self.model}", f"trainer.max_steps={self.args.steps}", "trainer.eval_every=0",
                     "trainer.save_every=0", f"output_dir={self.out}", f"run_name={name}",
                     f"trainer.reference_cache_dir={self.out / 'ref_cache'}", "trainer.warmup_steps=0",
                     "data.max_records=64", "trainer.batch_size=4", "trainer.micro_batch_size=2", *extra]
        if self.dry:
            overrides += ["deepspeed=none", "deepspeed.dtype=fp32"]
        else:
            overrides += ["deepspeed=zero2", "deepspeed.dtype=bf16"]
        env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
        env.setdefault("HF_HUB_OFFLINE", "1")
        if self.dry:
            env["DS_ACCELERATOR"] = "cpu"
        log = self.out / f"{name}.log"
        with open(log, "w") as handle:
            code = subprocess.run([python, "-m", "alignkit", "train", *overrides], stdout=handle,
                                  stderr=subprocess.STDOUT, env=env, timeout=900).returncode
        if code != 0:
            tail = log.read_text().strip().splitlines()[-3:]
            raise RuntimeError(f"alignkit train exited {code} (log {log}): " + " | ".join(tail))
        losses = [row["loss"] for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
                  if row.get("split", "train") == "train" and "loss" in row]
        if len(losses) != self.args.steps or not all(math.isfinite(x) for x in losses):
            raise RuntimeError(f"expected {self.args.steps} finite train losses, got {losses}")
        return run_dir

    def load(self, dtype):
        import torch

        from alignkit.config.compose import compose
        from alignkit.models.load import load_causal_lm
        from omegaconf import OmegaConf

        cfg = compose([f"recipe=sft_{self.model}"])
        model_cfg = OmegaConf.to_object(cfg.model)
        model, tokenizer = load_causal_lm(model_cfg, dtype={torch.float32: "fp32", torch.bfloat16: "bf16"}[dtype])
        return model.to(self.device).eval(), tokenizer

    # ------------------------------------------------------------------ checks
    def env(self) -> str:
        import torch

        if self.dry:
            return f"dry run on the CPU (torch {torch.__version__})"
        if not torch.cuda.is_available():
            raise RuntimeError("torch.cuda.is_available() is False (a CPU build of torch, or no visible GPU)")
        if not torch.cuda.is_bf16_supported():
            raise RuntimeError(f"{torch.cuda.get_device_name(0)} does not support bf16")
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"

    def sft(self) -> str:
        return self._summary(self.train("sft", "sft", "trainer.export=true"))

    def dpo(self) -> str:
        return self._summary(self.train("dpo", "dpo", "trainer.export=false"))

    def grpo(self) -> str:
        return self._summary(self.train("grpo", "grpo", "trainer.export=false", "generation.max_new_tokens=24",
                                        "rl.num_generations=4", "trainer.batch_size=2", "trainer.micro_batch_size=1"))

    def vllm_grpo(self) -> str:
        python = vllm_python()
        if python is None:
            raise Skip("vLLM is not installed (optional): ALIGNKIT_VLLM=cuda bash scripts/setup_vllm.sh, then rerun")
        extra = ["model.tiny.num_heads=2", "model.tiny.num_kv_heads=1"] if self.dry else []  # vLLM CPU: head size >= 32
        return self._summary(self.train("vllm_grpo", "grpo", "trainer.export=false", "generation.engine=vllm",
                                        "generation.max_new_tokens=24", "rl.num_generations=4", "trainer.batch_size=2",
                                        "trainer.micro_batch_size=1", *extra, python=python))

    def _summary(self, run_dir: Path) -> str:
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        losses = [round(r["loss"], 4) for r in rows if r.get("split", "train") == "train" and "loss" in r]
        return f"losses {losses}"

    def logps(self) -> str:
        import torch

        from alignkit.data.batch import TokenizedGroup
        from alignkit.data.collate import collate
        from alignkit.models.logprobs import TargetLogProbs, prepare_attention_mask

        notes = []
        for dtype, atol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
            model, tokenizer = self.load(dtype)
            head = TargetLogProbs(model, chunk_size=64)
            texts = [("What is 23 + 14?", "Answer: 37", "It is 38, I think."),
                     ("Copy the number: the blue key opens door 7.", "Answer: 7", "door seven")]
            groups = []
            for i, (prompt, chosen, rejected) in enumerate(texts):
                ids = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
                completions = [ids(chosen), ids(rejected)]
                groups.append(TokenizedGroup(prompt_ids=ids(prompt), completion_ids=completions,
                                             completion_train_mask=[[True] * len(c) for c in completions],
                                             example_id=str(i)))
            per_layout = {}
            for layout in ("padded", "packed", "prefix_shared"):
                batch = collate(groups, layout=layout, pad_token_id=tokenizer.pad_token_id).to(self.device)
                with torch.no_grad():
                    out = head(input_ids=batch.input_ids,
                               attention_mask=prepare_attention_mask(batch.attention_mask, dtype),
                               position_ids=batch.position_ids, target_index=batch.target_index,
                               target_ids=batch.target_ids)
                per_layout[layout] = out["logps"].float().cpu()
            for layout in ("packed", "prefix_shared"):
                diff = float((per_layout[layout] - per_layout["padded"]).abs().max())
                if not diff <= atol:
                    raise RuntimeError(f"{layout} vs padded ({dtype}): max |diff| {diff:.2e} > {atol:g}")
                notes.append(f"{layout} {str(dtype).split('.')[-1]} {diff:.1e}")
            del model, head
        return "max |diff| vs padded: " + ", ".join(notes)

    def export(self) -> str:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        final = self.out / "sft" / "final"
        if not (final / "config.json").is_file():
            raise RuntimeError(f"{final} has no exported model (the sft check must run first)")
        model = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32).to(self.device).eval()
        tokenizer = AutoTokenizer.from_pretrained(final)
        ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"].to(self.device)
        with torch.no_grad():
            logits = model(ids).logits
            generated = model.generate(ids, max_new_tokens=8, do_sample=False)
        if not torch.isfinite(logits).all():
            raise RuntimeError("the reloaded model's logits are not finite")
        if logits.shape[-1] < len(tokenizer):
            raise RuntimeError(f"vocabulary {logits.shape[-1]} < tokenizer {len(tokenizer)}")
        text = tokenizer.decode(generated[0, ids.shape[1]:], skip_special_tokens=True)
        return f"reloaded on {self.device}, greedy reply {text!r}"


ORDER = ("env", "sft", "dpo", "grpo", "logps", "export", "vllm_grpo")


def vllm_python() -> str | None:
    """An interpreter that imports vllm: .venv-vllm's, else this one; None when neither does."""
    root = Path(__file__).resolve().parents[1]
    for python in (root / ".venv-vllm" / "bin" / "python", Path(sys.executable)):
        if python.exists() and subprocess.run([str(python), "-c", "import importlib.util,sys; "
                                               "sys.exit(importlib.util.find_spec('vllm') is None)"],
                                              capture_output=True).returncode == 0:
            return str(python)
    return None


def run_checks(checks: list[tuple[str, Callable[[], str]]], print_line=print) -> int:
    """Run each check; one ``PASS name (seconds): note`` / ``FAIL name (seconds): reason`` line each."""
    failed = skipped = 0
    for name, check in checks:
        tick = time.time()
        try:
            note = check()
        except Skip as why:
            skipped += 1
            print_line(f"SKIP {name}: {why}")
        except Exception as exc:  # noqa: BLE001 - every failure is one FAIL line; the next check still runs
            failed += 1
            detail = traceback.format_exc().strip().splitlines()[-1] if not str(exc) else f"{type(exc).__name__}: {exc}"
            print_line(f"FAIL {name} ({time.time() - tick:.0f} s): {detail}")
        else:
            print_line(f"PASS {name} ({time.time() - tick:.0f} s): {note}")
        sys.stdout.flush()
    print_line(f"{len(checks) - failed - skipped}/{len(checks)} checks passed"
               + (f", {skipped} skipped" if skipped else ""))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    names = args.only.split(",") if args.only else list(ORDER)
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        print(f"unknown check(s) {unknown}; valid: {', '.join(ORDER)}", file=sys.stderr)
        return 2
    if args.dry_run:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    out = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="alignkit-gpu-check-"))
    out.mkdir(parents=True, exist_ok=True)
    print(f"alignkit GPU check{' (dry run: CPU, tiny model)' if args.dry_run else ''}; runs and logs in {out}")
    checks = Checks(args, out)
    return run_checks([(name, getattr(checks, name)) for name in ORDER if name in names])


if __name__ == "__main__":
    sys.exit(main())

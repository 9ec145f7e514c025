"""Shared test settings: CPU DeepSpeed, few threads, no hub access, a private cache per session."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 threads on 2 busy cores spin-wait badly
# deepspeed.dtype=auto stays fp32 on every CPU kind, so results do not depend on the machine (the precision
# tests set the switch themselves)
os.environ.setdefault("ALIGNKIT_CPU_AUTO_BF16", "0")


"""alignkit.engine: the one DeepSpeed code path (1 or N processes) and what runs around it.

* ``config``     DeepSpeedConfig knobs -> DeepSpeed JSON for trained and frozen models
* ``engine``     setup_distributed, init_train_engine (AdamW + warmup schedule), init_frozen_engine
* ``launcher``   build_launch_command (pure) and launch (the DeepSpeed launcher, signals forwarded)
* ``checkpoint`` atomic save / resume with RNG state, keep-last-K
* ``export``     consolidated transformers export (ZeRO-3 gathered), atomic
* ``metrics``    metrics.jsonl + console / TensorBoard / wandb; ``progress`` the rich bar
* ``faults``     stop-on-signal flag, non-finite tensor check
* ``cpu_memory`` CPU runs: the block cache that keeps peak RSS at the live peak (glibc fallback)

Submodules are imported on demand: importing ``alignkit.engine`` does not import DeepSpeed.
"""

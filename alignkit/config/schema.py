"""The config schema: every default lives here once (or in the dataclass an area owns).

The top-level ``AlignkitConfig`` is registered with Hydra's ConfigStore as ``schema`` and sits
first in ``conf/config.yaml``'s defaults list, so every YAML file on top of it is type-checked:
an unknown key or a value of the wrong type fails at compose time. YAML files in ``conf/`` and
``recipes/`` hold deltas only.

The ``loss`` node is the one free-form node: its keys are ``name`` (a loss name, a dotted path,
or a list of them), ``weights`` (one per name) and the hyper-parameters, whose defaults live in
the loss functions' signatures and are checked against them in ``validate.py``. ``reward.options``
is free-form the same way: ``<reward name>.<knob>``, checked against the reward functions'
signatures when the reward mix is built (``alignkit.rewards.registry.RewardMix``).

``typed_sections`` converts a config's sections to these dataclasses once, where a run starts
(``trainers.common.start``); the runners read them from the ``Run``.

Left out: per-trainer RL knobs beyond what the RL recipes read (``RLConfig``); they grow with
the online trainers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

from alignkit.data.config import DataConfig
from alignkit.engine.config import DeepSpeedConfig
from alignkit.engine.metrics import LoggerConfig
from alignkit.models.config import ModelConfig

REFERENCE_STRATEGIES = ("auto", "separate", "precomputed", "lora", "none")


@dataclass
class TrainerConfig:
    """Optimisation and loop settings shared by every runner.

    ``batch_size`` counts *groups* (prompts with their completions) per optimizer step across all
    processes; ``micro_batch_size`` counts groups per forward pass per process; the gradient
    accumulation steps follow from them and the world size (checked at compose time).
    """

    max_steps: int = 100  # optimizer steps; -1 = run ``epochs`` epochs
    epochs: float = 1.0
    batch_size: int = 8
    micro_batch_size: int = 2
    lr: float = 1e-5
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    warmup_steps: int = 0
    scheduler: str = "cosine"  # constant | linear | cosine (engine.SCHEDULERS), after warmup_steps
    eval_every: int = 50  # optimizer steps; 0 = only at the end
    eval_batch_size: int = 8
    max_eval_groups: int = 256
    save_every: int = 0  # optimizer steps; 0 = only at the end
    keep_last: int = 2
    log_every: int = 1
    seed: int = 0
    reference: str = "auto"  # separate | precomputed | lora | none | auto (by loss and model)
    reference_cache_dir: Optional[str] = None  # default: <cache>/ref_logps
    on_nonfinite: str = "stop"  # stop | skip
    # CPU runs: tensors >= 128 KiB come from alignkit's block cache (engine/cpu_memory.py), which
    # reuses freed mappings but never holds more than the peak of live bytes: peak RSS is what is
    # live instead of glibc's fragmented heap (SmolLM2 DPO bench: 2.95 -> 2.48 GB, steps ~6% slower)
    cpu_release_freed_memory: bool = True
    export: bool = True  # write a transformers-loadable model at the end
    merge_lora: bool = True  # LoRA runs: export the merged model (true) or the adapter alone (false)


@dataclass
class LauncherConfig:
    """How many processes, on which nodes (passed through to the DeepSpeed launcher)."""

    nproc_per_node: int = 1
    nnodes: int = 1
    hostfile: Optional[str] = None
    master_addr: Optional[str] = None
    master_port: Optional[int] = None
    include: Optional[str] = None
    exclude: Optional[str] = None
    node_rank: Optional[int] = None  # per-node start without ssh (srun, no-ssh clusters): this node's rank


@dataclass
class GenerationConfig:
    """Sampling settings of the online runners (PPO, GRPO, online DPO) and of ``alignkit eval``."""

    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    # online runners: hf (transformers generate) | vllm (colocated vLLM, weights pushed after each
    # optimizer step; its own environment: bash scripts/setup_vllm.sh; checked at compose time)
    engine: str = "hf"
    # hf engine, precision of the decoding matmuls: auto (bf16 under deepspeed.dtype=bf16_autocast, else the
    # weights') | fp32 | bf16 (alignkit.rl.lean_decode: Llama-family models; faster on a CPU)
    decode_dtype: str = "auto"
    vllm_gpu_memory_utilization: float = 0.3  # vllm on CUDA: share of device memory vLLM may take
    vllm_cpu_kv_cache_gib: float = 1.0  # vllm on CPU: its KV cache size


@dataclass
class RewardConfig:
    """Where rewards come from: rule-based functions by name or dotted path, and/or a reward model."""

    fns: list[str] = field(default_factory=lambda: ["judge"])
    weights: list[float] = field(default_factory=list)  # empty = all 1.0
    model: Optional[str] = None  # folder of a trained reward model (recipe=rm_* exports one), added to the rule rewards
    model_weight: float = 1.0
    # a trained process reward model (recipe=prm_* exports one; alignkit/rewards/process.py), added to the rewards:
    # each completion split into steps at its separator, each step's P(correct), aggregated over the steps
    prm: Optional[str] = None
    prm_weight: float = 1.0
    prm_aggregate: str = "min"  # min (PRM-min) | prod (product of the steps' P(correct)) | last (the last step's)
    prm_separator: Optional[str] = None  # None = the separator the PRM was trained with (its alignkit_prm.json)
    # per-function keyword options, reward.options.<name>.<knob> (e.g. ++reward.options.overlong.cache=64);
    # each knob must be a keyword parameter of that function (checked when the reward mix is built)
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class RLConfig:
    """Knobs of the online runners."""

    num_generations: int = 4  # samples per prompt (G); xpo, nash_md: half from the policy, half from the other sampler
    advantage: str = "grpo"  # grpo | rloo | reinforce_pp | reinforce_pp_baseline | gae
    scale_rewards: str = "group"  # group | batch | none
    ppo_epochs: int = 1  # mu: optimisation passes per generation batch
    kl_coef: float = 0.05  # PPO: KL penalty folded into the reward
    kl_estimator: str = "k1"  # k1 | k2 | k3
    gamma: float = 1.0
    lam: float = 0.95
    critic_lr: float = 1e-5  # the value network's learning rate: PPO's critic, DRO's value (runner=dro)
    whiten_advantages: bool = True
    dynamic_sampling: bool = False  # drop zero-variance groups and refill
    max_refill_rounds: int = 2
    rounds: int = 1  # online DPO, raft, sppo: iterative rounds
    update_reference_each_round: bool = True
    # raft: a prompt's best sample is trained on only if its reward is >= this (None: always the best)
    raft_min_reward: Optional[float] = None
    # nash_md: the second sample of each pair comes from pi^(1 - m) * ref^m (logits mixed), m in [0, 1]
    mixture_coef: float = 0.5  # TRL's NashMDConfig default; 0 = the policy itself, 1 = the reference
    # nash_md: P(policy sample beats mixture sample) from the rewards: sigmoid (TRL: sigmoid(r_a - r_b)) |
    # hard (1 higher, 0.5 tie, 0 lower)
    preference: str = "sigmoid"
    # gkd (trainers/gkd.py): the teacher (a model name_or_path as model.name_or_path takes; None = the policy's
    # starting model, as TRL's teacher_model_name_or_path=None), with tiny: its model.tiny.seed (None = the same)
    teacher: Optional[str] = None
    teacher_seed: Optional[int] = None
    lmbda: float = 0.5  # gkd: probability that a step trains on the student's own samples (TRL's GKDConfig.lmbda)
    seq_kd: bool = False  # gkd: off-policy steps train on the teacher's samples, not the data's (TRL's seq_kd)
    # sppo: the samples of each prompt its loss trains on: best_worst (the highest and the lowest win rate, as the
    # reference code uclaml/SPPO and the paper's experiments) | all (every sample: Algorithm 1's expectation over pi_t)
    sppo_samples: str = "best_worst"


@dataclass
class JudgeConfig:
    """Who picks chosen / rejected among online DPO's samples (``alignkit/rl/judges.py``); kind null = the rewards."""

    kind: Optional[str] = None  # null | rule | reward_model | pairwise | llm
    path: Optional[str] = None  # reward_model: a recipe=rm_* final/ folder; pairwise: pm_*; llm: a causal LM (null = model)
    fns: list[str] = field(default_factory=list)  # rule: reward functions (empty = reward.fns and reward.weights)
    # llm: the question, with {prompt}, {a} and {b}; the judge reads the next-token probabilities of "A" and "B"
    prompt_template: str = ("Which response is better? Answer with A or B.\n\nQuestion:\n{prompt}\n\n"
                            "Response A:\n{a}\n\nResponse B:\n{b}\n\nThe better response is")
    batch_size: int = 8  # comparisons per judge forward


@dataclass
class AlignkitConfig:
    recipe: Optional[str] = None  # preset name, set by recipes/*.yaml
    description: str = ""
    runner: str = "auto"  # auto (the one the loss declares) | a name of alignkit.losses.runners.RUNNERS
    resume: Optional[str] = None  # auto | PATH | null
    # keys a resume may change although they change what is trained (e.g. [trainer.lr]); see config/resume.py
    resume_allow: list[str] = field(default_factory=list)
    output_dir: str = "runs"
    run_name: Optional[str] = None  # default: <recipe or runner>-<timestamp>
    objective: str = "eval/rewards/accuracy"  # what a sweep job returns (Optuna maximises/minimises it)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: dict[str, Any] = field(default_factory=dict)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)


SECTIONS: dict[str, type] = {"trainer": TrainerConfig, "model": ModelConfig, "data": DataConfig,
                             "deepspeed": DeepSpeedConfig, "generation": GenerationConfig, "reward": RewardConfig,
                             "rl": RLConfig, "judge": JudgeConfig, "logger": LoggerConfig}


def typed_sections(cfg: DictConfig) -> dict[str, Any]:
    """The ``SECTIONS`` of a composed (or frozen) config as the schema's dataclasses, for a run to hold."""
    return {name: section(cfg, name, cls) for name, cls in SECTIONS.items()}


def section(cfg: DictConfig, name: str, cls: type) -> Any:
    """``cfg.<name>`` as a ``cls`` instance, checked against ``cls`` once more (a copy: ``cfg`` is unchanged)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), cfg[name]))

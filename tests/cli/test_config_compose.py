"""Every preset composes; user mistakes fail at compose time with the key and the valid choices."""

import pytest
from typer.testing import CliRunner

from alignkit.cli import app
from alignkit.config.compose import compose, list_recipes
from alignkit.config.validate import grad_accum_steps, runner_for
from alignkit.errors import ConfigError

RECIPES = [name for name, _ in list_recipes()]
REQUIRED = [f"{a}_{m}" for a in ("sft", "dpo", "simpo", "ppo", "grpo", "ipo", "kto", "orpo", "lipo")
            for m in ("llama3", "smollm2", "tiny")]


def test_required_presets_exist():
    missing = sorted(set(REQUIRED) - set(RECIPES))
    assert not missing, missing


# presets that need a value only the user has (a model folder); without it they fail with this message
NEEDS = {"grpo_prm_smollm2": ("reward.prm", "no reward source")}


@pytest.mark.parametrize("name", RECIPES)
def test_every_preset_composes(name, tmp_path):
    extra = []
    if name in NEEDS:
        key, message = NEEDS[name]
        with pytest.raises(ConfigError, match=message):
            compose([f"recipe={name}"])
        (tmp_path / "config.json").write_text('{"id2label": {"0": "incorrect", "1": "correct"}}')  # a PRM folder
        extra = [f"{key}={tmp_path}"]
    cfg = compose([f"recipe={name}", *extra])
    assert cfg.recipe == name
    assert cfg.description
    runner_for(cfg)  # the loss resolves and picks a runner


def test_llama3_preset_is_zero3_bf16_hub_model():
    cfg = compose(["recipe=dpo_llama3"])
    assert cfg.model.name_or_path == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert cfg.deepspeed.zero_stage == 3 and cfg.deepspeed.dtype == "bf16"


def test_overrides_apply_and_runner_follows_loss():
    cfg = compose(["recipe=dpo_tiny", "loss.beta=0.05", "trainer.lr=5e-7", "loss=simpo"])
    assert cfg.loss.name == "simpo" and cfg.loss.beta == 0.05 and cfg.trainer.lr == 5e-7
    assert runner_for(cfg) == "preference"
    assert runner_for(compose(["recipe=grpo_tiny"])) == "grpo"
    assert runner_for(compose(["recipe=sft_tiny"])) == "sft"


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["recipe=nope"], ["unknown preset 'nope'", "dpo_tiny"]),
        (["model=gpt9"], ["unknown option for 'model'", "smollm2", "tiny"]),
        # the closest valid key by name ("lr" alone would pass by accident: it is a substring of "lrr")
        (["trainer.lrr=1"], ["unknown config key 'trainer.lrr'", "Did you mean trainer.lr?"]),
        (["+trainer.lrr=1"], ["unknown config key 'trainer.lrr'", "Did you mean trainer.lr?"]),
        (["trainer.lr=fast"], ["trainer.lr='fast' has the wrong type", "expected a number"]),
        (["loss=bogus"], ["unknown option for 'loss'", "dpo"]),
        (["loss.name=bogus"], ["unknown loss 'bogus'", "dpo"]),
        (["recipe=dpo_tiny", "loss.betta=0.1"], ["betta", "beta"]),
        (["trainer.scheduler=wavy"], ["trainer.scheduler", "cosine"]),
        (["deepspeed.zero_stage=7"], ["zero_stage"]),
        (["recipe=dpo_tiny", "trainer.batch_size=5"], ["not divisible", "5"]),
        (["--lr=3"], ["unknown option '--lr=3'"]),
        (["recipe=dpo_tiny", "trainer.reference=lora"], ["model.lora.r"]),
        (["recipe=grpo_tiny", "reward.fns=[bogus]"], ["bogus", "judge"]),
        (["recipe=grpo_tiny", "rl.advantage=bogus"], ["bogus", "rloo"]),
        (["recipe=grpo_tiny", "rl.num_generations=1"], ["num_generations"]),
        (["recipe=dpo_tiny", "data.layout=diagonal"], ["layout", "prefix_shared"]),
        (["recipe=dpo_tiny", "model.dtype=fp8"], ["dtype", "bf16"]),
        (["recipe=dpo_tiny", "deepspeed.dtype=fp8"], ["deepspeed.dtype", "bf16"]),
        (["recipe=dpo_tiny", "loss.f_divergence=hellinger"], ["f_divergence", "js_divergence"]),
    ],
)
def test_compose_errors_name_key_and_choices(overrides, expected):
    with pytest.raises(ConfigError) as info:
        compose(overrides)
    message = str(info.value)
    for piece in expected:
        assert piece in message, message


def test_grad_accum_follows_world_size():
    cfg = compose(["recipe=dpo_tiny", "trainer.batch_size=8", "trainer.micro_batch_size=2", "launcher.nproc_per_node=2"])
    assert grad_accum_steps(cfg) == 2


runner = CliRunner()


def test_cli_help_lists_commands():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("train", "config", "recipes", "env", "data", "plan", "sweep-report"):
        assert command in result.output


def test_cli_recipes_lists_presets_with_descriptions():
    result = runner.invoke(app, ["recipes"], terminal_width=200)
    assert result.exit_code == 0
    assert "dpo_smollm2" in result.output and "SmolLM2" in result.output


def test_cli_config_show_prints_resolved_config():
    result = runner.invoke(app, ["config", "show", "recipe=dpo_tiny", "loss.beta=0.25"])
    assert result.exit_code == 0, result.output
    assert "beta: 0.25" in result.output and "name: dpo" in result.output


def test_cli_env_prints_versions():
    result = runner.invoke(app, ["env"])
    assert result.exit_code == 0
    for key in ("torch", "transformers", "deepspeed", "hydra-core", "deepspeed accelerator"):
        assert key in result.output


def test_cli_user_error_has_no_traceback():
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "alignkit", "config", "show", "recipe=nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "unknown preset 'nope'" in proc.stderr

"""The RL pieces fit together the way a GRPO/PPO trainer will chain them: generate -> stack ->
rewards -> advantages -> RolloutLogps -> loss -> backward, on a tiny random Llama."""

import torch
from tiny_llama import tiny_llama

from alignkit.losses import RolloutLogps, resolve_loss
from alignkit.rl import compute_advantages, compute_gae, shape_token_rewards, stack_rollouts
from alignkit.rl.generation import HFGenerationEngine

torch.set_num_threads(1)


def tiny_model():
    return tiny_llama(eos_token_id=7, pad_token_id=0)


def token_logps(model, prompts, rollouts, width):
    """Per-token log-probs [S, T] of each rollout's completion under ``model`` (one sequence at a time)."""
    rows = []
    for r in rollouts:
        prompt = prompts[r.prompt_index]
        ids = torch.tensor([prompt + r.completion_ids])
        logits = model(ids).logits[0, len(prompt) - 1 : -1]
        lp = logits.log_softmax(-1).gather(-1, torch.tensor(r.completion_ids)[:, None]).squeeze(-1)
        rows.append(torch.nn.functional.pad(lp, (0, width - lp.numel())))
    return torch.stack(rows)


def test_grpo_step_shapes_and_first_iteration_ratio_is_one():
    model = tiny_model()
    prompts = [[3, 4, 5], [9, 10]]
    rollouts = HFGenerationEngine(model).generate(prompts, num_samples=4, max_new_tokens=6, seed=0)
    batch = stack_rollouts(rollouts, pad_token_id=0)
    rewards = (batch.completion_ids == 11).float().sum(-1) + batch.mask.sum(-1) * 0.1  # any rule reward
    advantages = compute_advantages("grpo", rewards, batch.group_index, mask=batch.mask)
    model.train()
    logps = token_logps(model, prompts, rollouts, batch.mask.shape[1])
    inputs = RolloutLogps(
        logps=logps,
        old_logps=batch.logprobs,
        advantages=advantages,
        mask=batch.mask,
        group_index=batch.group_index,
    )
    loss, metrics = resolve_loss("grpo").fn(inputs, epsilon_low=0.2, epsilon_high=0.28)
    loss.backward()
    assert advantages.shape == batch.mask.shape
    assert metrics["clip_fraction"].item() == 0.0  # generation log-probs equal the fresh ones (mu = 1)
    assert abs(metrics["ratio/mean"].item() - 1.0) < 1e-4
    assert model.lm_head.weight.grad is not None and torch.isfinite(model.lm_head.weight.grad).all()


def test_ppo_step_with_kl_shaped_rewards_and_gae():
    model = tiny_model()
    prompts = [[3, 4, 5], [9, 10, 11, 12]]
    rollouts = HFGenerationEngine(model).generate(prompts, num_samples=2, max_new_tokens=5, seed=3)
    batch = stack_rollouts(rollouts)
    ref_logps = batch.logprobs + 0.05 * torch.randn(batch.logprobs.shape)
    token_rewards = shape_token_rewards(
        torch.ones(len(rollouts)), batch.mask, logps=batch.logprobs, ref_logps=ref_logps, kl_coef=0.1
    )
    old_values = torch.randn(batch.mask.shape) * batch.mask
    advantages, returns = compute_gae(token_rewards, old_values, batch.mask, gamma=1.0, lam=0.95)
    values = (old_values + 0.3).requires_grad_()
    logps = token_logps(model, prompts, rollouts, batch.mask.shape[1])
    inputs = RolloutLogps(
        logps=logps,
        old_logps=batch.logprobs,
        advantages=advantages,
        mask=batch.mask,
        values=values,
        old_values=old_values,
        returns=returns,
    )
    policy_loss, _ = resolve_loss("ppo").fn(inputs)
    value_loss, value_metrics = resolve_loss("ppo_value").fn(inputs, value_clip=0.2)
    (policy_loss + 0.5 * value_loss).backward()
    assert torch.isfinite(values.grad).all() and values.grad[~batch.mask].abs().sum() == 0
    assert value_metrics["value/clip_fraction"].item() > 0  # every value moved by 0.3 > clip 0.2

"""PPO: actor + critic (value head), reference, rule rewards or a reward model, KL in the reward, GAE.

One step: this rank's prompts -> ``rl.num_generations`` samples each -> scalar rewards -> one
no-grad pass for the sampling log-probs, the reference log-probs and the critic's values ->
token rewards ``-kl_coef * KL_t`` plus the scalar reward on the last token -> GAE advantages and
value targets (advantages whitened over the whole rollout batch: every micro-batch of every rank,
so ``trainer.micro_batch_size`` and the process count change nothing) -> ``rl.ppo_epochs`` passes of micro-batches, each updating
the actor (clipped surrogate, ``loss=ppo``) and the critic (clipped value loss ``ppo_value``),
both DeepSpeed engines. Left out: reward-model ensembles and PPO-max stabilisers.

Export: the actor to ``RUN_DIR/final`` like every runner, the trained critic to
``RUN_DIR/final_critic`` (same gathered export path, as a one-label ``*ForTokenClassification``
folder with LoRA merged; ``alignkit.models.value.load_value_model`` loads it back, e.g. to start
another PPO run's critic from it).
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from alignkit.config.validate import loss_terms
from alignkit.losses.registry import RolloutLogps, resolve_loss
from alignkit.data.batch import Batch
from alignkit.models.logprobs import forward_logps
from alignkit.trainers import common, loop, rollout


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """Train ``cfg``'s actor (``loss=ppo``) and a critic with GAE on KL-shaped rewards: ``{"exit_code": ...}``."""
    spec, _, hparams = loss_terms(cfg.loss)[0]
    value_loss = resolve_loss("ppo_value")
    from alignkit.models.value import ValueModel, load_value_model
    from alignkit.rl.advantages import compute_gae, whiten_batch
    from alignkit.rl.kl import kl_per_token, shape_token_rewards

    setup = loop.setup(cfg, run_dir, "prompt", kind="prompts")
    run, data, rl = setup.run, setup.data, setup.run.rl
    reward_mix = rollout.build_reward_mix(run, data, setup.tokenizer)  # dry-calls the reward functions
    num_samples, epochs, micro = rl.num_generations, rl.ppo_epochs, run.trainer.micro_batch_size
    actor, tokenizer = loop.policy_engine(run, setup.steps * epochs)
    critic_model, _ = load_value_model(run.model, dtype=run.deepspeed.dtype)
    critic = common.train_engine(critic_model, run, setup.steps * epochs, lr=rl.critic_lr)
    generator = rollout.generation_engine(run, actor, tokenizer)  # generation.engine: hf | vllm (weights pushed after each step)
    reference = rollout.online_reference(run, actor, beta=rl.kl_coef)
    evaluation = rollout.held_out_reward(run, actor, generator, tokenizer, data.eval, reward_mix)
    training = loop.begin(run, actor, setup.steps, evaluate=evaluation, extra_engines={"critic": critic})
    pad_id = tokenizer.pad_token_id

    for step in training:
        actor.eval()
        sampled = rollout.sample_groups(generator, tokenizer, rollout.prompt_schedule(run, data.train, step.number - 1),
                                        reward_mix, run.generation, num_samples=num_samples,
                                        seed=rollout.seed_for(run, step.number))
        experience, offset, kl_values = [], 0, []
        with torch.no_grad():
            for i in range(0, len(sampled.groups), micro):
                batch = common.collate_groups(sampled.groups[i : i + micro], run.data, pad_id).to(run.device)
                old = rollout.slot_tokens(forward_logps(actor, batch)["logps"], batch)
                mask = rollout.slot_tokens(torch.ones_like(batch.target_ids, dtype=torch.float32), batch).bool()
                ref_flat = reference.logps(batch, with_tokens=True)[1]
                ref = rollout.slot_tokens(ref_flat, batch) if ref_flat is not None else old
                values = rollout.slot_tokens(critic(**_value_inputs(batch)), batch)
                rewards = sampled.rewards[offset : offset + mask.shape[0]].to(run.device)
                offset += mask.shape[0]
                token_rewards = shape_token_rewards(rewards, mask, logps=old, ref_logps=ref,
                                                    kl_coef=rl.kl_coef, estimator=rl.kl_estimator)
                advantages, returns = compute_gae(token_rewards, values, mask, gamma=rl.gamma, lam=rl.lam)
                kl_values.append(kl_per_token(old, ref, rl.kl_estimator)[mask].mean())
                experience.append((batch, old, values, advantages, returns, mask))
        if rl.whiten_advantages:  # over the whole rollout batch (every micro-batch, every rank)
            whitened = whiten_batch([e[3] for e in experience], [e[5] for e in experience],
                                    all_reduce=lambda values: common.all_reduce_values(values, run))
            experience = [(*e[:3], adv, *e[4:]) for e, adv in zip(experience, whitened)]
        actor.train()
        for _ in range(epochs):
            for batch, old, old_values, advantages, returns, mask in experience:
                logps = rollout.slot_tokens(forward_logps(actor, batch)["logps"], batch)
                loss, metrics = spec.fn(RolloutLogps(logps=logps, old_logps=old, advantages=advantages, mask=mask),
                                        **hparams)
                if not step.update(actor, loss, {"loss": loss, **metrics}, tokens=batch.num_real_tokens()):
                    return training.stop_nonfinite(step)
                values = rollout.slot_tokens(critic(**_value_inputs(batch)), batch)
                v_loss, v_metrics = value_loss.fn(RolloutLogps(
                    logps=logps.detach(), old_logps=old, advantages=advantages, mask=mask,
                    values=values, old_values=old_values, returns=returns))
                if not step.update(critic, v_loss, {"value_loss": v_loss, **v_metrics}, name="value_loss"):
                    return training.stop_nonfinite(step)  # v_metrics: value/...
        metrics = {**rollout.reward_metrics(sampled), "kl": float(torch.stack(kl_values).mean())}
        if (stopped := training.end_step(step, metrics)) is not None:
            return stopped
    common.export_final(run, critic, tokenizer, "final_critic", prepare=ValueModel.as_token_classifier)
    return training.complete(tokenizer)


def _value_inputs(batch: Batch) -> dict[str, torch.Tensor]:
    return dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=batch.position_ids,
                target_index=batch.target_index)

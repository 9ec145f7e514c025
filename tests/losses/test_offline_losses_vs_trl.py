"""Our offline losses against TRL 1.16's own implementations, called on the same tensors.

TRL is a test-only dependency (``pip install trl==1.16.0``). Its trainers compute losses inside
methods that also run the model, so each test builds a trainer object cheaply (``object.__new__``
plus the attributes the method reads) and hands it a fake language model that returns fixed
per-token log-probs (DPO, KTO) or fixed logits (CPO, ORPO). Where we deliberately differ from TRL,
the difference itself is tested (and documented in the loss's docstring).
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from alignkit.losses import SequenceLogps, resolve_loss
from alignkit.losses.combine import build_objective

trl = pytest.importorskip("trl")
from trl import DPOTrainer, KTOTrainer  # noqa: E402
from trl.experimental.cpo import CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOTrainer  # noqa: E402

torch.set_num_threads(1)
METRIC_NAMES = {  # TRL name -> ours
    "rewards/chosen": "rewards/chosen",
    "rewards/rejected": "rewards/rejected",
    "rewards/margins": "rewards/margin",
    "rewards/accuracies": "rewards/accuracy",
    "logps/chosen": "logps/chosen",
    "logps/rejected": "logps/rejected",
}


class FakeAccelerator:
    device = torch.device("cpu")

    def gather(self, tensor):
        return tensor

    gather_for_metrics = gather

    def unwrap_model(self, model):
        return model


class FakeTokenLM(torch.nn.Module):
    """Returns fixed per-token outputs, chosen by the first input id (so one model can serve two batches)."""

    def __init__(self, by_first_id: dict[int, torch.Tensor], log_sq: torch.Tensor | None = None):
        super().__init__()
        self.by_first_id, self.log_sq = by_first_id, log_sq
        self.is_gradient_checkpointing = False

    def forward(self, input_ids, **_):
        log_probs = self.by_first_id[int(input_ids[0, 0])]
        zeros = torch.zeros_like(log_probs)
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros, is_top1=zeros.bool(),
                               log_sum_sq_probs=self.log_sq, aux_loss=None)


def _trainer(cls, model, ref_model, **attributes):
    trainer = object.__new__(cls)
    trainer.model, trainer.ref_model, trainer.accelerator = model, ref_model, FakeAccelerator()
    trainer.aux_loss_enabled, trainer.precompute_ref_logps = False, False
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens, trainer._tp_size = 0, 1
    for key, value in attributes.items():
        setattr(trainer, key, value)
    return trainer


# --- a fixed token-level pairwise batch: G=3 pairs, T=5, ragged lengths --------------------------

G, T = 3, 5
LENGTHS = torch.tensor([[5, 4], [3, 5], [2, 1]])


def _token_batch(seed: int = 0) -> SequenceLogps:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.arange(T).view(1, 1, T) < LENGTHS.unsqueeze(-1)
    token_logps = -(0.05 + 1.5 * torch.rand(G, 2, T, generator=gen)) * mask
    ref_token_logps = (token_logps + 0.4 * (torch.rand(G, 2, T, generator=gen) - 0.5)) * mask
    log_sq = -(0.1 + 1.2 * torch.rand(G, 2, T, generator=gen)) * mask
    return SequenceLogps(
        logps=token_logps.sum(-1), lengths=LENGTHS.float(), mask=torch.ones(G, 2, dtype=torch.bool),
        ref_logps=ref_token_logps.sum(-1), token_logps=token_logps, ref_token_logps=ref_token_logps,
        token_mask=mask, token_log_sq_mass=log_sq,
    )


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    """[G, 2, T] -> TRL's [2G, T]: all chosen rows, then all rejected rows."""
    return torch.cat([tensor[:, 0], tensor[:, 1]], dim=0)


def trl_dpo(batch: SequenceLogps, loss_types: list[str], loss_weights: list[float] | None = None, *,
            beta: float = 0.1, label_smoothing: float = 0.0, f_divergence_type: str = "reverse_kl",
            f_alpha_divergence_coef: float = 0.5, use_weighting: bool = False, ld_alpha: float | None = None,
            discopop_tau: float = 0.05):
    trainer = _trainer(
        DPOTrainer,
        FakeTokenLM({1: _rows(batch.token_logps)}, log_sq=_rows(batch.token_log_sq_mass)),
        FakeTokenLM({1: _rows(batch.ref_token_logps)}),
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        beta=beta, loss_types=loss_types, loss_weights=loss_weights or [1.0] * len(loss_types), ld_alpha=ld_alpha,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        label_smoothing=label_smoothing, use_weighting=use_weighting,
    )
    rows, width = 2 * batch.logps.shape[0], batch.token_logps.shape[-1] + 1
    completion_mask = torch.cat([torch.zeros(rows, 1, dtype=torch.long), _rows(batch.token_mask).long()], dim=1)
    inputs = {"input_ids": torch.ones(rows, width, dtype=torch.long),
              "attention_mask": torch.ones(rows, width, dtype=torch.long), "completion_mask": completion_mask}
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return loss, {ours: trainer._metrics["train"][theirs][-1] for theirs, ours in METRIC_NAMES.items()}


def _assert_same(ours, theirs):
    (loss, metrics), (trl_loss, trl_metrics) = ours, theirs
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5, abs=1e-6)
    for key, value in trl_metrics.items():
        assert metrics[key].item() == pytest.approx(value, rel=1e-5, abs=1e-6), key


REFERENCE_PAIRED = ["hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                    "apo_zero", "apo_down", "discopop", "sigmoid_norm"]
SMOOTHING = {"exo_pair": 1e-3, "robust": 0.1, "aot": 0.1}


@pytest.mark.parametrize("name", ["dpo"] + REFERENCE_PAIRED)
def test_dpo_family_matches_trl(name):
    batch, e = _token_batch(), SMOOTHING.get(name, 0.0)
    ours = resolve_loss(name).fn(batch, beta=0.3, **({"label_smoothing": e} if name in SMOOTHING else {}))
    theirs = trl_dpo(batch, ["sigmoid" if name == "dpo" else name], beta=0.3, label_smoothing=e)
    _assert_same(ours, theirs)


F_DIVERGENCE_LOSSES = ["dpo", "hinge", "ipo", "exo_pair", "robust", "discopop", "sigmoid_norm"]


@pytest.mark.parametrize("kind,f_alpha", [("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.3)])
@pytest.mark.parametrize("name", F_DIVERGENCE_LOSSES)
def test_f_divergences_match_trl(name, kind, f_alpha):
    batch, e = _token_batch(1), SMOOTHING.get(name, 0.0)
    extra = {"label_smoothing": e} if name in SMOOTHING else {}
    ours = resolve_loss(name).fn(batch, beta=0.5, f_divergence=kind, f_alpha=f_alpha, **extra)
    theirs = trl_dpo(batch, ["sigmoid" if name == "dpo" else name], beta=0.5, label_smoothing=e,
                     f_divergence_type=kind, f_alpha_divergence_coef=f_alpha)
    _assert_same(ours, theirs)


@pytest.mark.parametrize("name", ["dpo", "ipo", "sigmoid_norm", "nca_pair", "apo_down", "sppo_hard", "robust"])
@pytest.mark.parametrize("use_weighting,ld_alpha", [(True, None), (False, 0.3), (True, 0.0)])
def test_wpo_and_ld_dpo_match_trl(name, use_weighting, ld_alpha):
    batch, e = _token_batch(2), SMOOTHING.get(name, 0.0)
    extra = {"label_smoothing": e} if name in SMOOTHING else {}
    ours = resolve_loss(name).fn(batch, beta=0.2, use_weighting=use_weighting, ld_alpha=ld_alpha, **extra)
    theirs = trl_dpo(batch, ["sigmoid" if name == "dpo" else name], beta=0.2, label_smoothing=e,
                     use_weighting=use_weighting, ld_alpha=ld_alpha)
    _assert_same(ours, theirs)


def test_ld_dpo_with_aot_matches_trl():
    batch = _token_batch(3)
    _assert_same(resolve_loss("aot").fn(batch, ld_alpha=0.5), trl_dpo(batch, ["aot"], ld_alpha=0.5))


def test_discopop_tau_matches_trl():
    batch = _token_batch(4)
    _assert_same(resolve_loss("discopop").fn(batch, beta=1.0, tau=0.3),
                 trl_dpo(batch, ["discopop"], beta=1.0, discopop_tau=0.3))


def test_rpo_combination_matches_trl_multi_loss():
    batch = _token_batch(5)
    ours = build_objective(["dpo", "sft"], [1.0, 0.2], {"dpo": {"beta": 0.3}})(batch)
    _assert_same(ours, trl_dpo(batch, ["sigmoid", "sft"], [1.0, 0.2], beta=0.3))
    alone = build_objective(["sft"])(_token_batch(5))[0]
    assert alone.item() == pytest.approx(trl_dpo(batch, ["sft"])[0].item(), rel=1e-5)


def test_dpo_label_smoothing_is_conservative_dpo_where_trl_sigmoid_ignores_it():
    batch = _token_batch(6)
    trl_smoothed, _ = trl_dpo(batch, ["sigmoid"], label_smoothing=0.2)
    trl_plain, _ = trl_dpo(batch, ["sigmoid"])
    assert trl_smoothed.item() == pytest.approx(trl_plain.item())  # TRL 1.16 ignores it ...
    ours_smoothed, _ = resolve_loss("dpo").fn(batch, label_smoothing=0.2)
    assert abs(ours_smoothed.item() - trl_plain.item()) > 1e-3  # ... we do not
    # ours is TRL's own conservative form, which TRL keeps in aot: on a single pair, sorting is the identity
    for g in range(G):
        one = SequenceLogps(**{k: (v[g:g + 1] if torch.is_tensor(v) else v) for k, v in batch.__dict__.items()})
        ours_one, _ = resolve_loss("dpo").fn(one, label_smoothing=0.2)
        trl_aot_one, _ = trl_dpo(one, ["aot"], label_smoothing=0.2)
        assert ours_one.item() == pytest.approx(trl_aot_one.item(), rel=1e-5)


def test_discopop_is_finite_where_trl_gives_nan():
    batch = _token_batch(7)
    batch.logps = batch.logps.clone()
    batch.token_logps = batch.token_logps.clone()
    batch.token_logps[:, 0, 0] -= 3000.0  # chosen far below its reference: beta * margin = -300
    batch.logps[:, 0] -= 3000.0
    trl_loss, _ = trl_dpo(batch, ["discopop"])
    ours, _ = resolve_loss("discopop").fn(batch)
    assert torch.isnan(trl_loss) and torch.isfinite(ours)


# --- KTO and APO-zero (unpaired) through KTOTrainer._compute_loss ---------------------------------

LABELS = [True, False, True, True, False]


def _unpaired_batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    n = len(LABELS)
    logps, ref, kl, ref_kl = (-(1.0 + 4.0 * torch.rand(n, generator=gen)) for _ in range(4))
    ours = SequenceLogps(logps=logps.view(n, 1), lengths=torch.ones(n, 1), mask=torch.ones(n, 1, dtype=torch.bool),
                         ref_logps=ref.view(n, 1), labels=torch.tensor(LABELS).float().view(n, 1),
                         kl_logps=kl, ref_kl_logps=ref_kl)
    return ours, (logps, ref, kl, ref_kl)


def trl_unpaired(loss_type: str, tensors, *, beta: float, desirable_weight: float, undesirable_weight: float):
    logps, ref, kl, ref_kl = tensors
    n = len(LABELS)
    one_token = lambda x: x.view(n, 1)  # noqa: E731  (a one-token completion carries the whole sum)
    trainer = _trainer(
        KTOTrainer,
        FakeTokenLM({2: one_token(logps), 1: one_token(kl)}),  # first id 2: main batch, 1: KL batch
        FakeTokenLM({2: one_token(ref), 1: one_token(ref_kl)}),
        args=SimpleNamespace(gradient_checkpointing_kwargs=None), calculate_KL=loss_type == "kto",
        loss_type=loss_type, beta=beta, desirable_weight=desirable_weight, undesirable_weight=undesirable_weight,
    )
    ids = lambda v: torch.full((n, 2), v, dtype=torch.long)  # noqa: E731
    completion_mask = torch.tensor([[0, 1]] * n)
    inputs = {"label": torch.tensor(LABELS), "input_ids": ids(2), "attention_mask": ids(1),
              "completion_mask": completion_mask, "KL_input_ids": ids(1), "KL_attention_mask": ids(1),
              "KL_completion_mask": completion_mask}
    loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unpaired_losses_match_trl(name, seed):
    ours_inputs, tensors = _unpaired_batch(seed)
    hparams = dict(beta=0.3, desirable_weight=1.4, undesirable_weight=0.7)
    loss, metrics = resolve_loss(name).fn(ours_inputs, **hparams)
    trl_loss, trl_metrics = trl_unpaired(name, tensors, **hparams)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected"):
        assert metrics[key].item() == pytest.approx(trl_metrics[key], rel=1e-5), key
    assert metrics["rewards/margin"].item() == pytest.approx(trl_metrics["rewards/margins"], rel=1e-5)
    if name == "kto":
        assert metrics["kl"].item() == pytest.approx(trl_metrics["kl"], rel=1e-5, abs=1e-7)


# --- CPO, SimPO, ORPO through their trainers' get_batch_loss_metrics, on real logits ---------------

VOCAB = 11


class FakeLogitsLM(torch.nn.Module):
    """logits[b, t] = table[input_ids[b, t]]: a fixed 'bigram' model."""

    def __init__(self, seed: int):
        super().__init__()
        self.table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2.0

    def forward(self, input_ids, **_):
        return SimpleNamespace(logits=self.table[input_ids])


PROMPT = [3, 7]
COMPLETIONS = [([4, 2, 9, 1], [5, 5]), ([8, 6], [2, 10, 4]), ([1, 1, 3], [9])]  # (chosen, rejected) token ids


def _pair_tensors(pad: int = 0):
    def side(which):
        seqs = [PROMPT + c[which] for c in COMPLETIONS]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in seqs])
        attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
        labels = ids.masked_fill(attention == 0, -100)
        labels[:, : len(PROMPT)] = -100
        return ids, attention, labels

    (ci, ca, cl), (ri, ra, rl) = side(0), side(1)
    return {"chosen_input_ids": ci, "chosen_attention_mask": ca, "chosen_labels": cl,
            "rejected_input_ids": ri, "rejected_attention_mask": ra, "rejected_labels": rl}


def _our_inputs(model: FakeLogitsLM) -> SequenceLogps:
    """Summed log-probs of each completion under the fake model, computed here with log_softmax."""
    logps, lengths = [], []
    for chosen, rejected in COMPLETIONS:
        row_l, row_n = [], []
        for completion in (chosen, rejected):
            seq = PROMPT + completion
            log_probs = torch.log_softmax(model.table[torch.tensor(seq[:-1])], dim=-1)
            row_l.append(sum(log_probs[t - 1, seq[t]] for t in range(len(PROMPT), len(seq))))
            row_n.append(float(len(completion)))
        logps.append(torch.stack(row_l))
        lengths.append(row_n)
    return SequenceLogps(logps=torch.stack(logps), lengths=torch.tensor(lengths),
                         mask=torch.ones(len(COMPLETIONS), 2, dtype=torch.bool))


def _trl_pair_trainer(cls, **attributes):
    trainer = object.__new__(cls)
    trainer.accelerator, trainer.aux_loss_enabled, trainer.is_encoder_decoder = FakeAccelerator(), False, False
    trainer.padding_value, trainer.pad_token_id, trainer.label_pad_token_id = 0, 0, -100
    for key, value in attributes.items():
        setattr(trainer, key, value)
    return trainer


@pytest.mark.parametrize("cpo_alpha", [0.0, 1.0, 0.5])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_cpo_matches_trl(cpo_alpha, label_smoothing):
    model = FakeLogitsLM(0)
    trainer = _trl_pair_trainer(CPOTrainer, loss_type="sigmoid", beta=0.3, cpo_alpha=cpo_alpha, alpha=0.0,
                                label_smoothing=label_smoothing, simpo_gamma=0.5)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, _pair_tensors())
    loss, metrics = resolve_loss("cpo").fn(_our_inputs(model), beta=0.3, cpo_alpha=cpo_alpha,
                                           label_smoothing=label_smoothing)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    for theirs, ours in METRIC_NAMES.items():
        assert metrics[ours].item() == pytest.approx(trl_metrics[theirs], rel=1e-5, abs=1e-6), ours
    if cpo_alpha:
        assert metrics["cpo/nll"].item() == pytest.approx(trl_metrics["nll_loss"], rel=1e-5)


@pytest.mark.parametrize("beta,gamma,label_smoothing", [(2.0, 1.0, 0.0), (0.7, 0.3, 0.1)])
def test_simpo_matches_trl_with_cpo_alpha_zero(beta, gamma, label_smoothing):
    model = FakeLogitsLM(1)
    trainer = _trl_pair_trainer(CPOTrainer, loss_type="simpo", beta=beta, cpo_alpha=0.0, alpha=0.0,
                                label_smoothing=label_smoothing, simpo_gamma=gamma)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, _pair_tensors())
    loss, metrics = resolve_loss("simpo").fn(_our_inputs(model), beta=beta, gamma=gamma,
                                             label_smoothing=label_smoothing)
    assert loss.item() == pytest.approx(trl_loss.item(), rel=1e-5)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margin", "rewards/accuracy"):
        theirs = {v: k for k, v in METRIC_NAMES.items()}[key]
        assert metrics[key].item() == pytest.approx(trl_metrics[theirs], rel=1e-5, abs=1e-6), key
    # TRL's SimPO adds cpo_alpha * NLL unless cpo_alpha = 0; ours is simpo + sft through combine
    trainer.cpo_alpha = 1.0
    trl_with_nll, _ = trainer.get_batch_loss_metrics(model, _pair_tensors())
    ours_with_nll, _ = build_objective(["simpo", "sft"], hparams={"simpo": {"beta": beta, "gamma": gamma,
                                                                           "label_smoothing": label_smoothing}})(
        _our_inputs(model))
    assert ours_with_nll.item() == pytest.approx(trl_with_nll.item(), rel=1e-5)


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_orpo_odds_ratio_matches_trl_and_nll_differs_by_the_prompt_tokens(beta):
    model = FakeLogitsLM(2)
    trainer = _trl_pair_trainer(ORPOTrainer, beta=beta)
    trl_loss, trl_metrics = trainer.get_batch_loss_metrics(model, _pair_tensors())
    inputs = _our_inputs(model)
    loss, metrics = resolve_loss("orpo").fn(inputs, beta=beta)
    assert metrics["orpo/log_odds_ratio"].item() == pytest.approx(trl_metrics["log_odds_ratio"], rel=1e-5)
    assert metrics["orpo/log_odds_chosen"].item() == pytest.approx(trl_metrics["log_odds_chosen"], rel=1e-5)
    # same odds-ratio term: loss - nll agrees; the NLLs differ because TRL also counts prompt tokens
    assert (loss - metrics["orpo/nll"]).item() == pytest.approx(trl_loss.item() - trl_metrics["nll_loss"], rel=1e-5)
    assert metrics["orpo/nll"].item() != pytest.approx(trl_metrics["nll_loss"], rel=1e-3)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracy"):
        theirs = {v: k for k, v in METRIC_NAMES.items()}[key]
        assert metrics[key].item() == pytest.approx(trl_metrics[theirs], rel=1e-5, abs=1e-6), key

"""Preference-optimisation losses as pure torch functions, shared by the `dpo` stage and its benchmark.

- `sequence_logps(logits, labels)`: the log-probability a model gives each sequence's response,
  summed over the response tokens only. `labels` are the token ids with IGNORE_INDEX (-100) on
  every prompt and padding token, exactly as `templates.encode_example` builds them for
  `finetune`: position t's logits predict token t+1, so the logits are shifted one step left of
  the labels, as in causal-LM training.
- `dpo_loss(...)`: the sigmoid DPO loss (Rafailov et al. 2023, eq. 7),
  `-log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`, from the policy's and the
  reference model's summed log-probabilities of the chosen (c) and rejected (r) answers. The
  reference log-probabilities are plain numbers here, so a stage can compute them once before
  training and keep them with the data (only one model in memory).
- `simpo_loss(...)`: SimPO (Meng et al. 2024), the reference-free objective offered for machines
  that cannot afford even the one reference pass: `-log sigmoid(beta * (avg_c - avg_r) - gamma)`
  on the *average* log-probability per response token (so a longer answer is not favoured just
  for being longer) with a target margin gamma. It needs `sequence_logps(..., average=True)`.

Both return a `PreferenceLoss`: the mean loss, and what `metrics.jsonl` records per step. The
implicit reward of an answer is `beta * (pi - ref)` for DPO and `beta * avg` for SimPO.
`reward_accuracy` counts a pair whose two rewards are exactly equal as half right: at step 0 the
policy is the reference, every DPO reward is 0, and that is a coin flip, not "all wrong" (TRL
counts it as wrong, so its first logged accuracy is 0.0; ours is 0.5).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from pipeline.templates import IGNORE_INDEX

if TYPE_CHECKING:  # torch is imported where the losses run: the CLI (which reads dpo's config) starts without it
    import torch

# DPO's beta: how far the policy may move from the reference (a KL penalty's inverse strength).
# 0.1 is the value of the DPO paper's experiments and TRL's default.
DPO_BETA = 0.1
# SimPO's reward scale and target margin: beta 2.0 with gamma/beta = 0.5, the SimPO repository's
# recipe for Mistral-7B-base (the authors tune both per model; these are a starting point).
SIMPO_BETA = 2.0
SIMPO_GAMMA = 1.0
# Half credit for a pair whose two rewards are equal (see the module docstring).
TIE_CREDIT = 0.5


@dataclass
class PreferenceLoss:
    loss: torch.Tensor  # scalar, mean over pairs; the only field with a gradient
    reward_accuracy: torch.Tensor  # scalar: share of pairs whose chosen reward is higher
    reward_margin: torch.Tensor  # scalar: mean of chosen reward - rejected reward
    chosen_rewards: torch.Tensor  # [pairs], detached
    rejected_rewards: torch.Tensor  # [pairs], detached


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Per-sequence log-probability of the labelled (response) tokens: `[batch]` from `[batch, T, vocab]` logits.

    `labels` is `[batch, T]`, aligned with the inputs (not shifted), IGNORE_INDEX where a token
    is not part of the response. `average=True` divides each sum by its number of response
    tokens (a sequence with none gets 0, not NaN). Computed in float32 whatever the logits'
    dtype: a bf16 sum over hundreds of tokens loses the differences DPO is made of.
    """
    from torch.nn import functional as F

    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and labels {tuple(labels.shape)} disagree on batch and length")
    # Position t's logits predict token t+1.
    logits, labels = logits[:, :-1, :], labels[:, 1:]
    # cross_entropy is log_softmax + gather without a [batch, T, vocab] log-prob copy, and gives 0
    # at ignored positions, so the sum is over response tokens only.
    token_logps = -F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none")
    sums = token_logps.sum(dim=1)
    if not average:
        return sums
    counts = (labels != IGNORE_INDEX).sum(dim=1)
    return sums / counts.clamp(min=1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             reference_chosen: torch.Tensor, reference_rejected: torch.Tensor,
             beta: float = DPO_BETA) -> PreferenceLoss:
    """The sigmoid DPO loss from summed response log-probabilities, each `[pairs]`."""
    from torch.nn import functional as F

    chosen_logratios = policy_chosen - reference_chosen.to(policy_chosen)
    rejected_logratios = policy_rejected - reference_rejected.to(policy_rejected)
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return _result(losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach())


def simpo_loss(policy_chosen_avg: torch.Tensor, policy_rejected_avg: torch.Tensor,
               beta: float = SIMPO_BETA, gamma: float = SIMPO_GAMMA) -> PreferenceLoss:
    """SimPO from *average* response log-probabilities (`sequence_logps(..., average=True)`), each `[pairs]`."""
    from torch.nn import functional as F

    chosen_rewards = beta * policy_chosen_avg
    rejected_rewards = beta * policy_rejected_avg
    losses = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)
    return _result(losses, chosen_rewards.detach(), rejected_rewards.detach())


def _result(losses: torch.Tensor, chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> PreferenceLoss:
    wins = (chosen_rewards > rejected_rewards).float() + TIE_CREDIT * (chosen_rewards == rejected_rewards).float()
    return PreferenceLoss(
        loss=losses.mean(),
        reward_accuracy=wins.mean(),
        reward_margin=(chosen_rewards - rejected_rewards).mean(),
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
    )

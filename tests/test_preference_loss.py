"""The preference losses: hand-computed numbers, response-only log-probabilities, and TRL's DPOTrainer.

Every expected number below was worked out by hand from the formula, not by running the code.
"""

from __future__ import annotations

import math

import pytest
import torch

from pipeline.preference_loss import (DPO_BETA, IGNORE_INDEX, SIMPO_BETA, SIMPO_GAMMA, dpo_loss, sequence_logps,
                                      simpo_loss)

LN2 = 0.6931471806


def test_dpo_loss_on_hand_computed_log_probabilities_equals_the_formula():
    # pair 1: chosen log-ratio -1 - -2 = 1, rejected -3 - -2 = -1; beta * (1 - -1) = 0.2
    #   loss = log(1 + e^-0.2) = log(1.8187307531) = 0.5981388693
    # pair 2: chosen log-ratio 0, rejected -1 - -2 = 1; beta * (0 - 1) = -0.1
    #   loss = log(1 + e^0.1) = log(2.1051709181) = 0.7443966600
    result = dpo_loss(torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -1.0]),
                      torch.tensor([-2.0, -2.0]), torch.tensor([-2.0, -2.0]), beta=0.1)
    assert result.loss.item() == pytest.approx((0.5981388693 + 0.7443966600) / 2, abs=1e-6)
    assert result.chosen_rewards.tolist() == pytest.approx([0.1, 0.0])
    assert result.rejected_rewards.tolist() == pytest.approx([-0.1, 0.1])
    assert result.reward_accuracy.item() == pytest.approx(0.5)  # pair 1 right, pair 2 wrong
    assert result.reward_margin.item() == pytest.approx((0.2 + -0.1) / 2)


def test_dpo_beta_defaults_to_a_tenth_and_scales_the_log_ratio_difference():
    assert DPO_BETA == 0.1
    # log-ratio difference 2 at beta 0.5: loss = log(1 + e^-1) = 0.3132616875
    result = dpo_loss(torch.tensor([0.0]), torch.tensor([-2.0]), torch.tensor([0.0]), torch.tensor([0.0]), beta=0.5)
    assert result.loss.item() == pytest.approx(0.3132616875, abs=1e-6)
    default = dpo_loss(torch.tensor([0.0]), torch.tensor([-2.0]), torch.tensor([0.0]), torch.tensor([0.0]))
    assert default.loss.item() == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-6)


def test_policy_equal_to_reference_gives_log_2_and_half_accuracy():
    same = torch.tensor([-4.0, -7.5, -1.25])
    result = dpo_loss(same, same - 1, same, same - 1)
    assert result.loss.item() == pytest.approx(LN2, abs=1e-6)
    # every reward is 0: a coin flip, not "every pair wrong"
    assert result.reward_accuracy.item() == pytest.approx(0.5)
    assert result.reward_margin.item() == 0.0


def test_dpo_gradient_reaches_the_policy_and_raises_the_chosen_answer():
    policy_chosen = torch.tensor([-3.0], requires_grad=True)
    policy_rejected = torch.tensor([-3.0], requires_grad=True)
    reference = torch.tensor([-3.0])
    dpo_loss(policy_chosen, policy_rejected, reference, reference).loss.backward()
    # d/dx -log sigmoid(beta * x) at x = 0 is -beta / 2: descent raises chosen, lowers rejected
    assert policy_chosen.grad.item() == pytest.approx(-0.05)
    assert policy_rejected.grad.item() == pytest.approx(0.05)


def test_simpo_loss_on_hand_computed_averages():
    assert (SIMPO_BETA, SIMPO_GAMMA) == (2.0, 1.0)
    # pair 1: 2 * -0.5 - 2 * -1.0 - 1 = 0 -> log 2
    # pair 2: 2 * -0.25 - 2 * -1.5 - 1 = 1.5 -> log(1 + e^-1.5) = log(1.2231301601) = 0.2014132779
    result = simpo_loss(torch.tensor([-0.5, -0.25]), torch.tensor([-1.0, -1.5]))
    assert result.loss.item() == pytest.approx((LN2 + 0.2014132779) / 2, abs=1e-6)
    assert result.chosen_rewards.tolist() == pytest.approx([-1.0, -0.5])
    assert result.rejected_rewards.tolist() == pytest.approx([-2.0, -3.0])
    assert result.reward_accuracy.item() == 1.0
    assert result.reward_margin.item() == pytest.approx((1.0 + 2.5) / 2)


# Two sequences of 4 tokens over a vocabulary of 3. Position t's logits predict token t+1.
LOGITS = torch.tensor([
    [[0.0, 0.0, 0.0],            # predicts token 1 (label 2): p = 1/3
     [math.log(2), 0.0, 0.0],    # predicts token 2 (label 0): p = 2 / (2 + 1 + 1) = 1/2
     [9.0, -9.0, 0.0],           # predicts token 3: a prompt/padding token, must not count
     [5.0, 5.0, 5.0]],           # predicts nothing (no token 4)
    [[1.0, 2.0, 3.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]],
])
LABELS = torch.tensor([
    [IGNORE_INDEX, 2, 0, IGNORE_INDEX],
    [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX],  # no response token at all
])


def test_sequence_logps_sums_only_the_response_tokens_with_the_one_step_shift():
    # row 0: log(1/3) + log(1/2) = -log 6 = -1.7917594692; row 1: nothing to sum
    assert sequence_logps(LOGITS, LABELS).tolist() == pytest.approx([-1.7917594692, 0.0], abs=1e-6)
    # average over the 2 response tokens; a row with none is 0, not NaN
    assert sequence_logps(LOGITS, LABELS, average=True).tolist() == pytest.approx([-0.8958797346, 0.0], abs=1e-6)


def test_sequence_logps_ignores_the_logits_of_masked_positions():
    changed = LOGITS.clone()
    changed[0, 2] = torch.tensor([-50.0, 50.0, 0.0])  # only predicts the masked token 3
    changed[1] = torch.randn(4, 3)
    assert torch.equal(sequence_logps(changed, LABELS), sequence_logps(LOGITS, LABELS))


def test_sequence_logps_works_in_float32_from_bf16_logits():
    result = sequence_logps(LOGITS.to(torch.bfloat16), LABELS)
    assert result.dtype == torch.float32
    assert result.tolist() == pytest.approx([-1.7917594692, 0.0], abs=1e-2)


def test_sequence_logps_refuses_labels_of_another_shape():
    with pytest.raises(ValueError, match="disagree"):
        sequence_logps(LOGITS, LABELS[:, :3])


PAIRS = [
    {"prompt": "Name the capital of France.\n", "chosen": "Paris.", "rejected": "It is Lyon, a large city in the south."},
    {"prompt": "日本の首都はどこですか。\n", "chosen": "東京です。", "rejected": "大阪だと思います。たぶん。"},
    {"prompt": "2 + 2 = ", "chosen": "4", "rejected": "5"},
    {"prompt": "「ありがとう」を英語に訳してください。\n", "chosen": "Thank you.", "rejected": "ありがとう。"},
]


@pytest.mark.slow  # importing TRL and building its trainer: ~10 s on an idle 2-core machine
def test_dpo_loss_equals_trl_dpotrainer_on_the_same_batch_and_model(tiny_model_dir, tmp_path):
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    policy = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    # A policy that differs from the reference, so the log-ratios are not all 0 and a mistake in
    # either model's log-probabilities shows in the loss.
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in policy.parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.5)
    args = DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=len(PAIRS), beta=DPO_BETA,
                     max_length=128, report_to=[], use_cpu=True, bf16=False, dataloader_num_workers=0)
    trainer = DPOTrainer(model=policy, ref_model=reference, args=args,
                         train_dataset=Dataset.from_list(PAIRS), processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        expected = trainer.compute_loss(trainer.model, batch).item()
        # TRL's batch is [all chosen; all rejected], with the response marked by completion_mask.
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, IGNORE_INDEX)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        policy_logps = sequence_logps(trainer.model(**inputs).logits, labels)
        reference_logps = sequence_logps(trainer.ref_model(**inputs).logits, labels)
    ours = dpo_loss(*policy_logps.chunk(2), *reference_logps.chunk(2))
    assert abs(ours.loss.item() - LN2) > 1e-3  # the two models really differ on this batch
    assert ours.loss.item() == pytest.approx(expected, abs=1e-4)

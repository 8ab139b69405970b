"""The RL objective (train/objective.py) against hand-computed values: group-relative
advantages with infrastructure failures masked and signal-less groups dropped; the GRPO
clipped surrogate and sequence-level REINFORCE."""

from __future__ import annotations

import math

import pytest
import torch

from e2e_reme.train.objective import group_advantages, policy_loss

S = math.sqrt(2 / 9)   # std of (1, 0, 0)


def test_a_group_is_centred_on_its_mean_and_scaled_by_its_std():
    adv, keep, stats = group_advantages([1, 0, 0, 1], 4)
    assert adv == pytest.approx([1, -1, -1, 1], abs=1e-5) and all(keep)
    assert stats["groups"] == 1 and stats["masked_infrastructure"] == 0


def test_an_infrastructure_failure_is_masked_out_not_scored_as_a_failure():
    adv, keep, stats = group_advantages([1, None, 0, 0], 4)
    assert keep == [True, False, True, True]
    assert adv == pytest.approx([(2 / 3) / S, 0.0, -(1 / 3) / S, -(1 / 3) / S], abs=1e-5)
    assert stats["masked_infrastructure"] == 1


@pytest.mark.parametrize("rewards, why", [([1, 1, 1, 1], "groups_dropped_zero_variance"),
                                          ([0, 0, None, 0], "groups_dropped_zero_variance"),
                                          ([None, None, None, 1], "groups_dropped_too_few")])
def test_a_group_without_signal_is_dropped(rewards, why):
    adv, keep, stats = group_advantages(rewards, 4)
    assert not any(keep) and adv == [0.0] * 4 and stats[why] == 1


def test_groups_are_judged_apart_and_the_unscaled_form_only_centres():
    adv, keep, _ = group_advantages([1, 0, 1, 1], 2, scale="none")
    assert adv == [0.5, -0.5, 0.0, 0.0] and keep == [True, True, False, False]


@pytest.mark.parametrize("rewards, size, kw, match", [([1, 0, 1], 2, {}, "groups of 2"),
                                                      ([1, 0], 2, {"scale": "rank"}, "std, none")])
def test_bad_advantage_inputs_name_the_problem(rewards, size, kw, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, size, **kw)


def test_on_policy_grpo_is_minus_the_token_mean_of_the_advantages():
    lp = torch.zeros(2, 3)
    loss, stats = policy_loss(lp, lp.clone(), torch.tensor([1.0, -1.0]), torch.tensor([[1, 1, 0], [1, 0, 0]]))
    assert float(loss) == pytest.approx(-1 / 3) and stats["tokens"] == 3 and stats["clip_fraction"] == 0


def test_grpo_clips_asymmetrically():
    # ratio 2 with advantage +1 is held at 1.28; ratio 0.5 with advantage -1 at 0.8.
    lp = torch.log(torch.tensor([[2.0], [0.5]]))
    loss, stats = policy_loss(lp, torch.zeros(2, 1), torch.tensor([1.0, -1.0]), torch.ones(2, 1))
    assert float(loss) == pytest.approx(-(1.28 - 0.8) / 2) and stats["clip_fraction"] == 1.0
    inside, stats = policy_loss(torch.log(torch.tensor([[1.1]])), torch.zeros(1, 1), torch.tensor([1.0]),
                                torch.ones(1, 1))
    assert float(inside) == pytest.approx(-1.1) and stats["clip_fraction"] == 0.0


def test_reinforce_weighs_each_sequence_by_its_advantage_without_a_ratio():
    lp = torch.tensor([[-1.0, -2.0], [-3.0, 0.0]], requires_grad=True)
    loss, _ = policy_loss(lp, torch.full((2, 2), -9.0), torch.tensor([2.0, 1.0]),
                          torch.tensor([[1, 1], [1, 0]]), algorithm="reinforce")
    assert loss.item() == pytest.approx(-(2 * -3 + 1 * -3) / 2)
    loss.backward()
    assert lp.grad.flatten().tolist() == pytest.approx([-1.0, -1.0, -0.5, 0.0])


@pytest.mark.parametrize("algorithm", ["grpo", "reinforce"])
def test_a_masked_completion_contributes_nothing(algorithm):
    lp = torch.tensor([[-1.0, -1.0], [-5.0, -7.0]], requires_grad=True)
    mask = torch.tensor([[1, 1], [0, 0]])
    loss, _ = policy_loss(lp, lp.detach().clone(), torch.tensor([1.0, 3.0]), mask, algorithm=algorithm)
    loss.backward()
    assert lp.grad[1].tolist() == [0.0, 0.0] and lp.grad[0].abs().sum() > 0


def test_the_kl_to_the_reference_is_zero_at_the_reference_and_positive_elsewhere():
    lp, adv, mask = torch.zeros(1, 2), torch.tensor([0.0]), torch.ones(1, 2)
    _, same = policy_loss(lp, lp, adv, mask, ref_logprobs=lp, kl_coef=0.1)
    loss, apart = policy_loss(lp, lp, adv, mask, ref_logprobs=torch.full((1, 2), -1.0), kl_coef=0.1)
    assert same["kl_ref"] == 0.0
    assert apart["kl_ref"] == pytest.approx(math.exp(-1) + 1 - 1) and float(loss) == pytest.approx(0.1 * math.exp(-1))


def test_an_unknown_algorithm_names_the_choices():
    with pytest.raises(ValueError, match="grpo, reinforce"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1), torch.ones(1, 1), algorithm="ppo")


@pytest.mark.parametrize("n, c, k, want", [(8, 0, 8, 0.0), (8, 1, 8, 1.0), (8, 1, 1, 1 / 8), (8, 2, 2, 1 - 15 / 28),
                                           (4, 4, 2, 1.0), (10, 3, 5, 1 - 21 / 252)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, want):
    from e2e_reme.train.passk import pass_at_k
    assert pass_at_k(n, c, k) == pytest.approx(want)


def test_pass_at_k_needs_k_samples():
    from e2e_reme.train.passk import pass_at_k, summarize
    with pytest.raises(ValueError, match="k <= n"):
        pass_at_k(2, 1, 3)
    rows = [{"split": "train", "fault": "pod-fail", "n": 4, "c": 1}, {"split": "train", "fault": "pod-fail", "n": 1, "c": 1}]
    t = summarize(rows, 2)["train"]["pod-fail"]
    assert t["cases"] == 2 and t["pass@2"] == pytest.approx(0.5) and t["pass@1"] == pytest.approx((0.25 + 1) / 2)

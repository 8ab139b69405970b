"""The reinforcement fine-tuning objective: group-relative advantages and the policy loss,
as small pure functions of tensors, so that the loop in train/rl.py stays readable and a
multi-turn objective can be added beside them without touching it.

Advantages (GRPO's group baseline). The G completions of one scenario form a group. Only
judged completions count: one whose episode failed for the infrastructure (reward None,
cluster/judge.py) is masked out, never scored as the policy's failure. Each judged
completion's advantage is its reward minus the mean of its group's judged rewards, divided
by their standard deviation (`scale="std"`, GRPO) or not (`scale="none"`, Dr. GRPO's
unbiased form). A group whose judged rewards are all equal (all fixed, all failed) or that
has fewer than two judged completions carries no signal and is dropped.

Two objectives, one switch:
- `grpo`: token-level clipped surrogate with an asymmetric clip (DAPO's clip-higher:
  0.2 below, 0.28 above), the importance ratio taken against the logprobs stored at
  sampling (so slightly stale samples stay correct), averaged over every completion token
  of the batch; an optional k3 KL estimate to a reference policy (`kl_coef`, off by
  default).
- `reinforce`: REINFORCE with the same group-relative advantages at sequence level, no
  ratio and no clipping: the sequence's summed log-probability times its advantage,
  averaged over sequences. SeeUPO (MISSION.md) shows this converges to the optimum in the
  single-turn, undiscounted setting where PPO-clip with group-relative advantages loses its
  monotonic-improvement guarantee.
"""

from __future__ import annotations

import math
from typing import Sequence

ALGORITHMS = ("grpo", "reinforce")
SCALES = ("std", "none")


def group_advantages(rewards: Sequence[float | None], group_size: int, *, scale: str = "std",
                     eps: float = 1e-6) -> tuple[list[float], list[bool], dict]:
    """Per completion (groups are consecutive runs of `group_size`): its advantage and
    whether it enters the loss; with counts of what was left out and why."""
    if scale not in SCALES:
        raise ValueError(f"advantage scale {scale!r}: choose one of {', '.join(SCALES)}")
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not split into groups of {group_size}")
    adv, keep = [0.0] * len(rewards), [False] * len(rewards)
    stats = {"groups": len(rewards) // group_size, "groups_dropped_zero_variance": 0,
             "groups_dropped_too_few": 0, "masked_infrastructure": sum(r is None for r in rewards)}
    for start in range(0, len(rewards), group_size):
        idx = [i for i in range(start, start + group_size) if rewards[i] is not None]
        if len(idx) < 2:
            stats["groups_dropped_too_few"] += 1
            continue
        vals = [float(rewards[i]) for i in idx]
        mean = sum(vals) / len(vals)
        std = math.sqrt(sum((v - mean) ** 2 for v in vals) / len(vals))
        if std < eps:
            stats["groups_dropped_zero_variance"] += 1
            continue
        for i, v in zip(idx, vals):
            adv[i] = (v - mean) / (std + eps) if scale == "std" else v - mean
            keep[i] = True
    return adv, keep, stats


def policy_loss(logprobs, old_logprobs, advantages, mask, *, algorithm: str = "grpo",
                clip_low: float = 0.2, clip_high: float = 0.28, ref_logprobs=None, kl_coef: float = 0.0):
    """The loss to minimise and its statistics. Tensors: `logprobs`, `old_logprobs`,
    `ref_logprobs` and `mask` are [batch, tokens] (mask 1 on the completion tokens that
    count, 0 on padding and on masked completions); `advantages` is [batch]."""
    import torch

    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm {algorithm!r}: choose one of {', '.join(ALGORITHMS)}")
    mask = mask.to(logprobs.dtype)
    adv = advantages.to(logprobs.dtype).unsqueeze(1)
    tokens = mask.sum().clamp(min=1.0)
    log_ratio = (logprobs - old_logprobs) * mask
    ratio = torch.exp(log_ratio)
    with torch.no_grad():
        stats = {"tokens": float(mask.sum()),
                 "approx_kl_old": float(((ratio - 1) - log_ratio).mul(mask).sum() / tokens)}
    if algorithm == "grpo":
        clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high)
        surrogate = torch.minimum(ratio * adv, clipped * adv)
        loss = -(surrogate * mask).sum() / tokens
        stats["clip_fraction"] = float(((surrogate != ratio * adv).to(mask.dtype) * mask).sum().detach() / tokens)
    else:
        rows = (mask.sum(dim=1) > 0).to(logprobs.dtype)
        seq_logprob = (logprobs * mask).sum(dim=1)
        loss = -(adv.squeeze(1) * seq_logprob * rows).sum() / rows.sum().clamp(min=1.0)
        stats["clip_fraction"] = 0.0
    if ref_logprobs is not None and kl_coef:
        d = (ref_logprobs - logprobs) * mask
        kl = ((torch.exp(d) - d - 1) * mask).sum() / tokens
        loss = loss + kl_coef * kl
        stats["kl_ref"] = float(kl.detach())
    stats["loss"] = float(loss.detach())
    return loss, stats


__all__ = ["ALGORITHMS", "SCALES", "group_advantages", "policy_loss"]

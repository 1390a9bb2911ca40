"""Scoring next-token predictions: the one definition of the LM loss that training, evaluation and
the runtime's perplexity share, and the distillation KL.

Both training terms come from one log-softmax of the student's logits. At SmolLM2's 49k-token vocabulary the logits of one batch are hundreds of MB; every pass over
them costs on a CPU. ``F.cross_entropy`` plus ``F.kl_div`` would take the student's log-softmax
twice and carry a gradient through a full-size difference tensor; here it is taken once and the
KL's teacher-only term is computed without a gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_cross_entropy(log_probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """``(batch, seq - 1)`` next-token losses, from ``log_probs`` ``(batch, seq, vocab)`` of ``ids``."""
    targets = ids[:, 1:]
    return F.nll_loss(log_probs[:, :-1].flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)


def token_nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Summed next-token negative log-likelihood (nats, fp32) of ``ids`` under ``logits``: the held-out score."""
    return token_cross_entropy(logits.float().log_softmax(-1), ids).sum()


def distillation_kl(student_log_probs: torch.Tensor, teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) = sum_v p_t (log p_t - log p_s).

    The teacher's ``sum p_t log p_t`` has no gradient; only the cross term ``-sum p_t log p_s``
    (a soft-target cross-entropy) is differentiated."""
    with torch.no_grad():
        teacher_probs = teacher_log_probs.exp()
        negative_entropy = (teacher_probs * teacher_log_probs).sum(-1)
    cross = (teacher_probs * student_log_probs).sum(-1)
    return (negative_entropy - cross).mean()

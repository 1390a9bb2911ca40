"""Scoring next-token predictions: the one definition of the LM loss that training, evaluation and
the runtime's perplexity share, and the distillation KL.

Both training terms come from one log-softmax of the student's logits. At SmolLM2's 49k-token vocabulary the logits of one batch are hundreds of MB; every pass over
them costs on a CPU. ``F.cross_entropy`` plus ``F.kl_div`` would take the student's log-softmax
twice and carry a gradient through a full-size difference tensor; here it is taken once and the
KL's teacher-only term is computed without a gradient.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

NO_TARGET = -100  # the last position of a block has no next token


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


def chunked_losses(
    hidden: torch.Tensor, head: nn.Module, ids: torch.Tensor, teacher_hidden: torch.Tensor | None = None,
    chunk_tokens: int = 0,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The ``(batch, seq - 1)`` next-token losses and the mean KL(teacher || student), from final
    hidden states, never holding more than ``chunk_tokens`` rows of logits at once.

    Each chunk's logits are made, scored and dropped; backward makes them again (activation
    checkpointing of the head), so peak memory holds one chunk of student and teacher logits in
    fp32 rather than the whole batch's. ``chunk_tokens`` 0 (or more than the batch holds) scores
    the batch in one piece, with nothing recomputed. Same values and gradients either way, to
    float rounding."""
    batch, seq = ids.shape
    rows = batch * seq
    targets = F.pad(ids[:, 1:], (0, 1), value=NO_TARGET).flatten()
    student = hidden.flatten(0, 1)
    teacher = None if teacher_hidden is None else teacher_hidden.flatten(0, 1)
    step = rows if chunk_tokens <= 0 else min(chunk_tokens, rows)
    score = partial(_score_chunk, head)
    losses, kl_sum = [], None
    for start in range(0, rows, step):
        part = slice(start, start + step)
        args = (student[part], targets[part], None if teacher is None else teacher[part])
        loss, kl = checkpoint(score, *args, use_reentrant=False) if step < rows else score(*args)
        losses.append(loss)
        if kl is not None:
            kl_sum = kl if kl_sum is None else kl_sum + kl
    token_loss = torch.cat(losses).view(batch, seq)[:, :-1]
    return token_loss, None if kl_sum is None else kl_sum / rows


def _score_chunk(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, teacher_hidden: torch.Tensor | None):
    """Per-row losses (0 where there is no target) and the summed KL of one chunk of rows."""
    log_probs = head(hidden).float().log_softmax(-1)
    loss = F.nll_loss(log_probs, targets, ignore_index=NO_TARGET, reduction="none")
    if teacher_hidden is None:
        return loss, None
    with torch.no_grad():
        teacher = head(teacher_hidden).float().log_softmax(-1)
    return loss, distillation_kl(log_probs, teacher) * hidden.shape[0]

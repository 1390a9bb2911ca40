import torch
import torch.nn.functional as F

from koff.scoring import distillation_kl, token_cross_entropy


def test_shared_log_softmax_terms_equal_torch_losses_in_value_and_gradient():
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (3, 9))
    teacher = torch.randn(3, 9, 50).log_softmax(-1)
    logits = torch.randn(3, 9, 50, requires_grad=True)
    ref_logits = logits.detach().clone().requires_grad_()

    ours = token_cross_entropy(logits.log_softmax(-1), ids).mean() + distillation_kl(logits.log_softmax(-1), teacher)
    ce = F.cross_entropy(ref_logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    kl = F.kl_div(ref_logits.log_softmax(-1), teacher, log_target=True, reduction="none").sum(-1).mean()
    ours.backward()
    (ce + kl).backward()

    torch.testing.assert_close(ours, ce + kl)
    torch.testing.assert_close(logits.grad, ref_logits.grad)
    assert distillation_kl(teacher, teacher).abs() < 1e-6  # a student equal to its teacher

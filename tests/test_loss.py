"""The fused output projection + cross-entropy (llm/model/loss.py) equals the plain computation, in value
and in both gradients, against float64: across chunk boundaries, with ignored targets and label
smoothing; and the chunked backward never needs the full logits."""
import pytest
import torch
import torch.nn.functional as F

import llm.model.loss
from llm.model.loss import linear_cross_entropy


def reference(x, weight, targets, label_smoothing):
    """F.cross_entropy(F.linear(x, weight)) in float64, with autograd's gradients."""
    x64 = x.detach().double().requires_grad_()
    w64 = weight.detach().double().requires_grad_()
    loss = F.cross_entropy(x64 @ w64.T, targets, ignore_index=-1, label_smoothing=label_smoothing)
    loss.backward()
    return loss.detach(), x64.grad, w64.grad


@pytest.mark.parametrize("rows", [1, 7, 64])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_fused_loss_matches_float64_reference(rows, label_smoothing, seed, monkeypatch):
    monkeypatch.setattr(llm.model.loss, "CHUNK_ELEMENTS", 3 * 50)  # 3 rows of a 50-token vocabulary per chunk
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 16, generator=g, requires_grad=True)
    weight = (0.3 * torch.randn(50, 16, generator=g)).requires_grad_()
    targets = torch.randint(0, 50, (rows,), generator=g)
    targets[torch.rand(rows, generator=g) < 0.2] = -1  # ignored positions
    scale = torch.rand((), generator=g) + 0.5  # the loss feeds a larger graph: its gradient is not 1
    loss = linear_cross_entropy(x, weight, targets, label_smoothing)
    (loss * scale).backward()
    ref_loss, ref_gx, ref_gw = reference(x, weight, targets, label_smoothing)
    if (targets < 0).all():
        assert loss.item() == 0 or torch.isnan(ref_loss)
        return
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x.grad.double(), ref_gx * scale.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), ref_gw * scale.double(), rtol=1e-4, atol=1e-6)


def test_bf16_inputs_accumulate_in_fp32(seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(256, 32, generator=g).bfloat16().requires_grad_()
    weight = (0.2 * torch.randn(100, 32, generator=g)).requires_grad_()  # fp32 master weight, as under autocast
    targets = torch.randint(0, 100, (256,), generator=g)
    loss = linear_cross_entropy(x, weight, targets)
    loss.backward()
    ref_loss, _, ref_gw = reference(x.float(), weight.bfloat16().float(), targets, 0.0)
    assert loss.dtype == torch.float32 and weight.grad.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss.double(), ref_loss, rtol=2e-2, atol=2e-2)
    assert (weight.grad.double() - ref_gw).norm() / ref_gw.norm() < 2e-2


def test_evaluation_path_equals_training_path(seed):
    """Without gradients the loss is the plain computation; with them, the fused one: the same value."""
    g = torch.Generator().manual_seed(seed)
    x, weight = torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)
    targets = torch.randint(-1, 30, (40,), generator=g)
    plain = linear_cross_entropy(x, weight, targets)
    fused = linear_cross_entropy(x.requires_grad_(), weight, targets)
    torch.testing.assert_close(fused.detach(), plain)

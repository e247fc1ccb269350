"""The training loss: output projection and cross-entropy, fused and computed in row chunks.

The logits of a training batch are its largest tensor (tokens × vocabulary: 2048 × 8192 fp32
is 64 MB, 16k × 32k is 2 GB), and the plain computation writes and re-reads it several times
(logits, log-softmax, its gradient). Here each chunk of rows goes through projection,
log-softmax, loss and gradient while it is still in cache, and the gradients with respect to
the hidden states and the weight are computed right away (the gradient of cross-entropy with
respect to the logits is softmax − one-hot, known in the forward pass), so the full logits
never exist. Same FLOPs, same result as F.cross_entropy(F.linear(x, weight), targets).
"""
import torch

CHUNK_ELEMENTS = 1 << 22  # logits per chunk: 16 MB in fp32, small enough to stay in cache


def project(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weightᵀ; in fp32 on CPU through oneDNN, which is faster than MKL's sgemm (the plain
    product's) for the head's thin shapes on some CPUs (docs/results.md)."""
    if (x.dtype == torch.float32 and x.device.type == "cpu" and torch.backends.mkldnn.is_available()
            and not torch.compiler.is_compiling()):  # (compiled, inductor chooses its own kernel)
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return x @ weight.T


def _chunk_loss_and_grad(x, weight, targets, label_smoothing: float):
    """(summed loss, d loss_i / d logits_i) of one chunk; rows with target -1 count 0 in the loss
    (their gradient rows are the caller's to zero)."""
    logits = project(x, weight)
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    valid = targets >= 0
    safe = targets.clamp(min=0)[:, None]
    loss = -logp.gather(1, safe).squeeze(1)
    if label_smoothing:
        loss = (1 - label_smoothing) * loss - label_smoothing * logp.mean(dim=-1)
    grad = logp.exp_()  # softmax, in place
    grad.scatter_add_(1, safe, torch.full(safe.shape, label_smoothing - 1, dtype=grad.dtype, device=grad.device))
    if label_smoothing:
        grad.sub_(label_smoothing / grad.size(-1))
    return (loss * valid).sum(), grad


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, targets, label_smoothing, mean):
        accumulate = torch.promote_types(weight.dtype, torch.float32)
        # 1/N for the mean, as a tensor: no host synchronization
        scale = 1.0 / (targets >= 0).sum().clamp(min=1).to(accumulate) if mean else torch.ones((), dtype=accumulate, device=x.device)
        w = weight.to(x.dtype)
        rows = max(1, CHUNK_ELEMENTS // weight.size(0))
        total = torch.zeros((), device=x.device, dtype=accumulate)
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros_like(weight, dtype=accumulate)
        for start in range(0, x.size(0), rows):
            xs, ts, gx = x[start : start + rows], targets[start : start + rows], grad_x[start : start + rows]
            loss, grad = _chunk_loss_and_grad(xs, w, ts, label_smoothing)
            total += loss
            # 1/N and the ignored rows' zeros, applied to the products: a pass over (rows, d), not (rows, vocabulary)
            row_scale = ((ts >= 0) * scale)[:, None]
            torch.mul(project(grad.to(x.dtype), w.T), row_scale, out=gx)
            grad_w.addmm_(grad.T, xs.to(accumulate) * row_scale)  # accumulated in fp32 at least, whatever x's dtype
        ctx.save_for_backward(grad_x, grad_w.to(weight.dtype))
        return total * scale

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        return grad_x * grad_loss, grad_w * grad_loss, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         label_smoothing: float = 0.0, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of logits x @ weightᵀ against targets (-1: ignored), never holding all the
    logits: the mean over the targets, or their sum (reduction="sum"; the trainer divides by the
    targets of a whole step). x: (N, d); weight: (vocabulary, d); targets: (N,)."""
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
    if not (x.requires_grad or weight.requires_grad):  # evaluation: no gradients to prepare
        logits = project(x, weight.to(x.dtype))
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        return torch.nn.functional.cross_entropy(logits, targets, ignore_index=-1, label_smoothing=label_smoothing,
                                                 reduction=reduction)
    return _LinearCrossEntropy.apply(x, weight, targets, label_smoothing, reduction == "mean")

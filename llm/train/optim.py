"""Optimizers and learning-rate schedules.

Two recipes, chosen by TrainConfig.optimizer:
- adamw: AdamW on every parameter, decoupled weight decay on the 2-D ones (matrices and
  embeddings) only.
- muon: Muon on the 2-D weights inside the transformer blocks (attention wqkv/wo, feed-forward
  w1/w2/w3); AdamW, as above, on the rest (embeddings, output head, norms, biases).

`make_optimizers` returns a list of optimizers: step them all. `set_hyperparameters` writes the
current config's values into every group before each step, so a resumed run uses its own
settings, not those its restored optimizer state carries. `lr_multiplier` is the schedule.
"""
import math

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

from llm.config import TrainConfig

# The quintic Newton–Schulz coefficients published with Muon (Keller Jordan, 2024): chosen to
# maximize the slope at zero, so 5 steps push every singular value into roughly [0.7, 1.2]
# rather than converging exactly to 1, which trains as well and costs far fewer steps.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
NS_STEPS = 5


def newton_schulz(g: torch.Tensor, steps: int = NS_STEPS, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The 2-D matrix g with its singular values pushed towards 1 (≈ U·Vᵀ of g = U·S·Vᵀ)."""
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: the Gram matrix x·xᵀ is then the smaller one
        x = x.T
    x = x / (x.norm() + 1e-7)  # Frobenius norm ≥ spectral norm: singular values now ≤ 1
    for _ in range(steps):
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.T if tall else x).to(g.dtype)


def orthogonalize(updates: list[torch.Tensor], dtype: torch.dtype) -> list[torch.Tensor]:
    """newton_schulz of each update. Newton–Schulz needs the whole matrix: FSDP's row-sharded
    DTensors are shared out among the ranks in rounds of world_size, each rank orthogonalizing one
    matrix of a round whole (`orthogonalize_round`); any other DTensor layout is gathered on every rank."""
    first = next((u for u in updates if isinstance(u, DTensor)), None)
    sharded = [i for i, u in enumerate(updates) if isinstance(u, DTensor) and u.device_mesh == first.device_mesh
               and u.device_mesh.ndim == 1 and tuple(u.placements) == (Shard(0),) and u.dtype == first.dtype]
    results = [None] * len(updates)
    for i, u in enumerate(updates):
        if i in sharded:
            continue
        if isinstance(u, DTensor):
            full = newton_schulz(u.full_tensor(), dtype=dtype)
            results[i] = distribute_tensor(full, u.device_mesh, u.placements, src_data_rank=None)
        else:
            results[i] = newton_schulz(u, dtype=dtype)
    size = first.device_mesh.size() if sharded else 1
    for start in range(0, len(sharded), size):
        batch = sharded[start : start + size]
        for i, result in zip(batch, orthogonalize_round([updates[i] for i in batch], dtype)):
            results[i] = result
    return results


def shard_rows(rows: int, size: int) -> list[int]:
    """The rows each rank holds of a matrix split as torch.chunk splits (the last ranks may hold none)."""
    chunk = -(-rows // size)
    return [max(0, min(rows, (k + 1) * chunk) - k * chunk) for k in range(size)]


def orthogonalize_round(batch: list[DTensor], dtype: torch.dtype) -> list[DTensor]:
    """Rank j orthogonalizes batch[j] (at most one matrix per rank): one all-to-all brings rank j
    every rank's rows of it, a second returns each rank its rows of every result."""
    mesh = batch[0].device_mesh
    group, size, me = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    local = [u.to_local().reshape(-1) for u in batch]
    assert all(u.to_local().shape[0] == shard_rows(u.shape[0], size)[me] for u in batch), "not torch.chunk's rows"
    sent = [t.numel() for t in local] + [0] * (size - len(batch))  # my rows of matrix j go to rank j
    mine = batch[me] if me < len(batch) else None
    received = [r * mine.shape[1] for r in shard_rows(mine.shape[0], size)] if mine is not None else [0] * size
    send = torch.cat(local)
    gathered = send.new_empty(sum(received))
    dist.all_to_all_single(gathered, send, received, sent, group=group)
    result = newton_schulz(gathered.view(mine.shape), dtype=dtype).reshape(-1) if mine is not None else gathered
    back = send.new_empty(send.numel())
    dist.all_to_all_single(back, result, sent, received, group=group)
    return [DTensor.from_local(piece.view(u.to_local().shape), mesh, u.placements, shape=u.shape, stride=u.stride())
            for piece, u in zip(back.split(sent[: len(batch)]), batch)]


class Muon(torch.optim.Optimizer):
    """Muon: momentum SGD whose update is orthogonalized, for 2-D weight matrices.

    Per step, for a weight W (rows × cols = fan-out × fan-in) with gradient G:
        B ← μ·B + (1 − μ)·G                      momentum buffer (state "momentum_buffer")
        U ← (1 − μ)·G + μ·B                      Nesterov
        O ← newton_schulz(U)                     singular values ≈ 1
        W ← W·(1 − lr·λ) − lr·√max(1, rows/cols)·O

    Learning-rate scaling: Keller Jordan's original √max(1, rows/cols). O has min(rows, cols)
    singular values near 1, so its entries have RMS 1/√max(rows, cols); the factor brings every
    shape to 1/√cols (1/√fan-in, the scale of a standard initialization), so one lr suits
    square, tall (w1, w3, wqkv) and wide (w2) matrices alike. We keep it rather than torch's
    "match_rms_adamw" (0.2·√max(rows, cols), which lets Muon reuse AdamW's lr) because our
    config gives Muon its own lr, muon_lr = 0.02, the value tuned with this convention in the
    published runs. Weight decay is decoupled and scaled by the unscaled lr, as in
    torch.optim.Muon and the original.

    Why not torch.optim.Muon (same definition, same state name): it always runs Newton–Schulz
    in bfloat16, so 2 FSDP processes drift from 1 by the rounding of differently reduced
    gradients, and on FSDP's DTensors each matmul and norm redistributes (a collective each)
    where one all-gather per matrix suffices.

    Under FSDP2 the parameters, gradients and momentum buffers are DTensors sharded on dim 0:
    the elementwise work stays sharded, and `orthogonalize` shares the matrices out, each rank
    running Newton–Schulz on 1/world_size of them, whole (as the distributed Muon implementations
    do), instead of every rank repeating all of them. The buffers stay sharded, so
    torch.distributed.checkpoint saves and reshards them like AdamW's.

    ns_dtype: the precision of Newton–Schulz (see make_optimizers). An attribute, not a group
    setting, so a checkpoint does not carry it to another device.
    """

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, weight_decay: float = 0.0,
                 ns_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))
        self.ns_dtype = ns_dtype
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D weights only, got a parameter of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
            params = [p for p in group["params"] if p.grad is not None]
            updates = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                updates.append(p.grad.lerp(buf, mu))
            for p, update in zip(params, orthogonalize(updates, self.ns_dtype)):
                rows, cols = p.shape  # the full shape, also for a DTensor shard
                p.mul_(1 - lr * wd)
                p.add_(update, alpha=-lr * math.sqrt(max(1.0, rows / cols)))
        return loss


def muon_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The 2-D weights inside the transformer blocks (through any wrapper: FSDP, checkpointing)."""
    return [p for p in model.layers.parameters() if p.requires_grad and p.dim() == 2]


def make_optimizers(model: torch.nn.Module, cfg: TrainConfig, device: torch.device,
                    compute_dtype: torch.dtype = torch.float32) -> list[torch.optim.Optimizer]:
    """AdamW (weight decay on 2-D parameters only), plus Muon for the blocks' matrices when
    cfg.optimizer is "muon". Hyperparameters come from cfg; set_hyperparameters re-applies them.

    Muon's Newton–Schulz iterates in the run's compute dtype: bf16 for a bf16 run, as in the
    published Muon (it only needs the singular values pushed near 1, and bf16 about halves its
    time), fp32 otherwise, so that an fp32
    run on 2 FSDP processes stays within rounding of 1 process (bf16 would amplify the different
    order of their gradient reductions).

    AdamW is fused on CPU as on CUDA: one kernel per step, several times faster than foreach's.
    """
    matrices = muon_params(model) if cfg.optimizer == "muon" else []
    in_muon = {id(p) for p in matrices}
    rest = [p for p in model.parameters() if p.requires_grad and id(p) not in in_muon]
    groups = [{"params": [p for p in rest if p.dim() >= 2]}, {"params": [p for p in rest if p.dim() < 2]}]
    fused = device.type in ("cpu", "cuda")
    optimizers = [torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr, fused=fused, foreach=not fused)]
    if matrices:
        ns_dtype = torch.bfloat16 if compute_dtype == torch.bfloat16 else torch.float32
        optimizers.append(Muon(matrices, lr=cfg.muon_lr, ns_dtype=ns_dtype))
    set_hyperparameters(optimizers, cfg, 1.0)
    return optimizers


def set_hyperparameters(optimizers: list[torch.optim.Optimizer], cfg: TrainConfig, lr_multiplier: float):
    """Write cfg's values into every group, each lr scaled by lr_multiplier. Call before every
    step: loading optimizer state replaces the groups' settings with the saved run's.

    A group's role is read from the optimizer and its parameters, not from a key of our own,
    so state saved before a key existed (or by another version) still gets the right values."""
    for optimizer in optimizers:
        for group in optimizer.param_groups:
            if isinstance(optimizer, Muon):
                group.update(lr=cfg.muon_lr * lr_multiplier, momentum=cfg.muon_momentum, weight_decay=cfg.weight_decay)
            else:
                decay = all(p.dim() >= 2 for p in group["params"])
                group.update(lr=cfg.lr * lr_multiplier, betas=(cfg.beta1, cfg.beta2),
                             weight_decay=cfg.weight_decay if decay else 0.0)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """The schedule: the fraction of each group's peak lr to use at `step` (0-based).

    Both schedules warm up linearly (step 0 gets 1/warmup_steps) and reach lr·min_lr_ratio at
    decay_steps (default max_steps), constant after.
    cosine: after warmup, cosine decay over the rest of decay_steps.
    wsd (warmup-stable-decay): constant, then linear decay over the last cooldown_fraction of
    decay_steps (if that starts inside the warmup, the smaller of the two applies).
    """
    decay_steps = cfg.decay_steps or cfg.max_steps
    warmup = (step + 1) / cfg.warmup_steps if step < cfg.warmup_steps else 1.0
    if cfg.schedule == "cosine":
        if step < cfg.warmup_steps:
            return warmup
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, decay_steps - cfg.warmup_steps))
        return cfg.min_lr_ratio + 0.5 * (1.0 + math.cos(math.pi * progress)) * (1.0 - cfg.min_lr_ratio)
    cooldown = cfg.cooldown_fraction * decay_steps
    if step >= decay_steps:
        progress = 1.0
    else:
        progress = max(0.0, (step - (decay_steps - cooldown)) / cooldown) if cooldown > 0 else 0.0
    return min(warmup, 1.0 - progress * (1.0 - cfg.min_lr_ratio))

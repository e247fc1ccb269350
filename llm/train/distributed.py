"""Process groups and FSDP2 sharding, kept outside the model.

Under torchrun every process joins a process group (nccl on CUDA, gloo on CPU)
and `parallelize` applies `fully_shard` to every block and to the root module.
Without torchrun there is no process group and every helper here is a no-op, so
one training loop serves both.
"""
import os
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from llm.runtime import choose_device


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    control: object = None  # a gloo group for host-side flags: no GPU synchronization
    device_reason: str = ""

    @property
    def enabled(self) -> bool:
        return dist.is_available() and dist.is_initialized()

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup(device_name: str = "auto") -> Dist:
    """Join the process group when launched by torchrun; pick this process's device."""
    if "RANK" not in os.environ:
        choice = choose_device(device_name)
        return Dist(device=choice.value, device_reason=choice.reason)
    local_rank = int(os.environ["LOCAL_RANK"])
    choice = choose_device(device_name, local_rank)
    device = choice.value
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, device_id=device if device.type == "cuda" else None,
                            timeout=timedelta(minutes=30))
    control = dist.new_group(backend="gloo") if backend != "gloo" else dist.group.WORLD
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device, control, choice.reason)


def teardown():
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(status: int | str | None):
    """sys.exit(status), except in a torchrun worker: there the process ends without the interpreter's teardown.

    FSDP2's DTensor caches keep the process group, and gloo's threads, alive after
    destroy_process_group; destroying them while the interpreter shuts down aborted a finished,
    saved run once in CI ("terminate called without an active exception", SIGABRT, exit -6).
    By the time this runs every rank has passed the final barrier and closed its files.
    """
    if "RANK" not in os.environ:
        sys.exit(status)
    if isinstance(status, str):  # what sys.exit would print
        print(status, file=sys.stderr)
        status = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status or 0)


def parallelize(model: nn.Module, d: Dist, param_dtype: torch.dtype | None, activation_checkpointing: bool) -> nn.Module:
    """Activation checkpointing per block (optional), then FSDP2 when in a process group.

    param_dtype: with FSDP, parameters are cast to it for compute (bf16 on CUDA)
    while gradients are reduced in fp32 and the sharded master weights stay fp32.
    """
    if activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        for i, block in enumerate(model.layers):
            model.layers[i] = checkpoint_wrapper(block)
    if not d.enabled:
        return model
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for block in model.layers:
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def barrier(d: Dist):
    if d.enabled:
        dist.barrier(group=d.control)


def sum_across_ranks(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def total_across_ranks(n: int, d: Dist) -> int:
    """The sum of a host-side integer over the ranks (a CPU collective on the gloo group)."""
    if not d.enabled:
        return n
    t = torch.tensor([n], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.SUM, group=d.control)
    return int(t.item())


def any_rank(flag: bool, d: Dist) -> bool:
    """True if the flag is set on any rank (a CPU collective on the gloo group)."""
    if not d.enabled:
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=d.control)
    return bool(t.item())

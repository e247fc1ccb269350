"""A model's CPU tensors moved into memory backed by 2 MB pages, for the decode step to stream.

A decode step reads every weight once per token, hundreds of MB, faster than the TLB can map
them in 4 KB pages: every 4 KB read of the stream costs a page-table walk. Linux backs anonymous
memory with transparent huge pages (2 MB) where the program asks for them with
madvise(MADV_HUGEPAGE), which PyTorch's allocator does not do by default (its
THP_MEM_ALLOC_ENABLE must be set before its first allocation). So `into_huge_pages` copies the
tensors into one mapping that asks for them. At SmolLM2-135M's shapes on a 2-core EPYC, a fp32
matrix-vector product streams 10-14% faster and the decode step takes 4-7% less (docs/decoding.md).
Where the kernel does not grant them (THP "never", or no free 2 MB pages) the memory is plain
pages and nothing else changes; where the copy cannot be mapped at all (no memory left for it),
the weights stay where they are.
"""
import mmap
from pathlib import Path

import torch
import torch.nn as nn

HUGE_PAGE = 2 << 20
ALIGNMENT = 64  # bytes: every tensor starts on a cache line, as PyTorch's allocator places them
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether this system can back memory with transparent huge pages on request."""
    try:
        return hasattr(mmap, "MADV_HUGEPAGE") and "[never]" not in THP_SETTING.read_text()
    except OSError:
        return False


def huge_page_bytes(nbytes: int) -> torch.Tensor:
    """A uint8 tensor of nbytes, 2 MB-aligned, in private anonymous memory advised to huge pages
    (pages are granted as the memory is first written)."""
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    region.madvise(mmap.MADV_HUGEPAGE)
    memory = torch.frombuffer(region, dtype=torch.uint8)  # the tensor keeps the mapping alive
    start = -memory.data_ptr() % HUGE_PAGE
    return memory[start:start + nbytes]


def huge_page_copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of these CPU tensors side by side in one huge-page mapping, each on a 64-byte line."""
    sizes = [-(-tensor.nbytes // ALIGNMENT) * ALIGNMENT for tensor in tensors]
    memory, offset, copies = huge_page_bytes(sum(sizes)), 0, []
    for tensor, size in zip(tensors, sizes):
        copies.append(memory[offset:offset + tensor.nbytes].view(tensor.dtype).view(tensor.shape).copy_(tensor))
        offset += size
    return copies


def into_huge_pages(model: nn.Module) -> int:
    """Copy the model's dense CPU parameters and buffers into one huge-page mapping, in place
    (tensors shared by several modules stay shared); returns the bytes moved, 0 where the system
    has no huge pages to give or the model is not on the CPU."""
    groups: dict[tuple, list] = {}  # one copy per distinct tensor, every reference to it updated
    for module in model.modules():
        for store in (module._parameters, module._buffers):
            for name, tensor in store.items():
                if (tensor is not None and tensor.device.type == "cpu" and tensor.layout == torch.strided
                        and not tensor.is_mkldnn and tensor.is_contiguous() and tensor.numel() > 0):
                    key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
                    groups.setdefault(key, []).append((store, name, tensor))
    if not groups or not available():
        return 0
    try:
        copies = huge_page_copies([references[0][2] for references in groups.values()])
    except OSError:  # no address space or memory for a second copy: the weights stay where they are
        return 0
    for references, moved in zip(groups.values(), copies):
        for store, name, reference in references:
            if isinstance(reference, nn.Parameter):
                reference.data = moved
            else:
                store[name] = moved
    return sum(moved.nbytes for moved in copies)

"""Shared test setup.

Triton decides once per process, when it is first imported, whether kernels run
compiled or in its interpreter. On a machine without CUDA the kernels can only
run interpreted, so the choice is made here, before any test module (or a
library such as transformers) gets the chance to import triton.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


import pytest  # noqa: E402


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test (fresh inputs every run), printed so a failure can be replayed."""
    value = int.from_bytes(os.urandom(4), "little")
    print(f"seed = {value}")
    torch.manual_seed(value)
    return value

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


@pytest.fixture(autouse=True)
def no_tf32_leak():
    """train.py turns on TF32 matmuls for CUDA training, for the whole process: a training test
    must not leave it on for a later test that compares fp32 on the GPU with float64."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture
def seed() -> int:
    """A fresh random seed per test (fresh inputs every run), printed so a failure can be replayed."""
    from tests.helpers import fresh_seed

    return fresh_seed()


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """About 40 standard-library modules (~1 MB): enough tokens for the tiny config's windows."""
    import shutil

    from llm.train.data import stdlib_sources

    directory = tmp_path_factory.mktemp("corpus")
    files = [f for f in stdlib_sources() if "/test/" not in f and "/idlelib/" not in f][:40]
    for i, f in enumerate(files):
        shutil.copy(f, directory / f"{i:03d}_{os.path.basename(f)}")
    return directory


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    """Tokenizers and token files, shared by the tests that train."""
    return tmp_path_factory.mktemp("cache")

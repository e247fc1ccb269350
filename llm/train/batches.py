"""What a training step consumes: batches of inputs and targets on the device.

A `Batch` holds token ids and their targets (-1 where a position has no target: padding,
masked prompt tokens in fine-tuning), how many targets count, and for windows that pack several
conversations, which one each position belongs to (llm/train/chat_data.py). A batch source gives the
training batch of any (step, micro-batch) as a pure function of them, so a resumed run, or the
same global batch spread over more processes, sees the same data; and the fixed validation
batches, shared out among the ranks.
"""
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from llm.config import RunConfig
from llm.eval import target_bytes
from llm.model.tokenizer import Tokenizer
from llm.train.data import eval_windows, train_windows
from llm.train.distributed import Dist


@dataclass
class Batch:
    inputs: torch.Tensor  # (B, T) token ids
    targets: torch.Tensor  # (B, T) next tokens; -1: no target
    n_targets: int  # targets that count (>= 0), known on the host without a device sync
    documents: torch.Tensor | None = None  # (B, T) which packed document each position is in (fine-tuning)

    def model_inputs(self) -> dict:
        """The keyword arguments of the model that say how the rows are laid out."""
        return {} if self.documents is None else {"documents": self.documents}


def to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(array).astype(np.int64))
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def batch_of_windows(windows: np.ndarray, device: torch.device, rows_without_targets: int = 0) -> Batch:
    """Windows of block_size + 1 tokens -> inputs and their next tokens (none in the last
    rows_without_targets rows)."""
    targets = windows[:, 1:].astype(np.int64)
    if rows_without_targets:
        targets[len(targets) - rows_without_targets:] = -1
    return Batch(to_device(windows[:, :-1], device), to_device(targets, device), int((targets >= 0).sum()))


class WindowBatches:
    """Pretraining: random windows of block_size + 1 tokens from the training tokens, and fixed
    windows evenly spread over the validation tokens."""

    def __init__(self, train_tokens: np.ndarray, val_tokens: np.ndarray, run: RunConfig, d: Dist,
                 tokenizer: Tokenizer):
        self.train_tokens, self.cfg, self.d = train_tokens, run.train, d
        self.block_size = run.model.block_size
        # Every rank gets as many validation rows (so all run the same forward passes); padding
        # rows have no targets.
        windows = eval_windows(val_tokens, self.block_size, self.cfg.eval_iters * self.cfg.batch_size)
        self.val_bytes = target_bytes(tokenizer, windows)  # of all ranks' windows together
        mine = windows[d.rank :: d.world_size]
        rows = math.ceil(len(windows) / d.world_size)
        self.val_windows = np.concatenate([mine, windows[: rows - len(mine)]])
        self.val_rows = len(mine)  # the rest are padding

    def train(self, step: int, micro: int) -> Batch:
        # The global micro-batch index: K processes × A accumulation steps read the same
        # windows as one process with K·A accumulation steps.
        index = self.d.rank * self.cfg.grad_accum + micro
        windows = train_windows(self.train_tokens, self.block_size, self.cfg.batch_size, self.cfg.seed, step, index)
        return batch_of_windows(windows, self.d.device)

    def validation(self) -> Iterator[Batch]:
        for i in range(0, len(self.val_windows), self.cfg.batch_size):
            w = self.val_windows[i : i + self.cfg.batch_size]
            real = min(len(w), max(0, self.val_rows - i))  # padding rows come last
            yield batch_of_windows(w, self.d.device, rows_without_targets=len(w) - real)

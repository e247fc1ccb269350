"""Run metrics: metrics.jsonl, a loss-curve PNG, and optionally Weights & Biases.

A write that finds no room (full disk, quota, file-size limit) skips the record with a one-line
warning and the run goes on: its next checkpoint, which cannot be written either, ends it in one line
with the last checkpoint intact (llm.train.checkpoint), on every rank at once.
"""
import contextlib
import json
import os
import sys
from pathlib import Path

from llm.files import NO_ROOM, temporary_sibling, write_text


class MetricsLog:
    """Appends one JSON object per record; only the main process writes."""

    def __init__(self, run_dir: Path, enabled: bool, resume_step: int | None = None, wandb_settings: dict | None = None):
        self.path = run_dir / "metrics.jsonl"
        self.plot_path = run_dir / "loss.png"
        self.enabled = enabled
        self.wandb = None
        self.warned = False
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Steps logged after the checkpoint we resume from are about to be redone.
            kept = [r for r in self.records() if r["step"] <= resume_step]
            with self.unless_full(self.path):
                write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        if wandb_settings is not None:
            import wandb

            self.wandb = wandb.init(**wandb_settings)

    @property
    def wandb_id(self) -> str | None:
        """Saved with each checkpoint, so that a resumed run continues the same wandb run."""
        return self.wandb.id if self.wandb is not None else None

    @contextlib.contextmanager
    def unless_full(self, path: Path):
        """Skip what the body writes to `path` if there is no room for it (warned once)."""
        try:
            yield
        except OSError as e:
            if e.errno not in NO_ROOM:
                raise
            if not self.warned:
                print(f"warning: cannot write {path}: {e.strerror}; metrics are skipped while there is no room",
                      file=sys.stderr)
                self.warned = True

    def log(self, record: dict):
        if not self.enabled:
            return
        with self.unless_full(self.path), open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    def records(self) -> list[dict]:
        """The records logged so far; a line cut short (by a full disk) is left out."""
        if not self.path.exists():
            return []
        return [r for r in map(parsed, self.path.read_text(errors="replace").splitlines())
                if isinstance(r, dict) and "step" in r]

    def plot(self):
        """Redraw loss.png (training and validation loss against step)."""
        if not self.enabled:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        records = self.records()
        fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
        for key, label in (("loss", "train"), ("val_loss", "validation")):
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), label=label, marker="o" if key == "val_loss" else None)
        ax.set_xlabel("step")
        ax.set_ylabel("cross-entropy loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        tmp = temporary_sibling(self.plot_path)
        try:
            with self.unless_full(self.plot_path):
                fig.savefig(tmp, format="png")
                os.replace(tmp, self.plot_path)
        finally:
            plt.close(fig)
            tmp.unlink(missing_ok=True)

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()


def parsed(line: str):
    try:
        return json.loads(line)
    except json.JSONDecodeError:
        return None


# Dense bf16 tensor-core peaks (FLOP/s) by device name, for model FLOPs utilization.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}


def peak_flops(device) -> float | None:
    import torch

    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_BF16_FLOPS.items() if key in name), None)


def flops_per_token(model) -> float:
    """Training FLOPs per token (PaLM appendix B): 6 per weight used in a matmul, plus attention.

    Attention is counted as 12·n_layer·n_head·head_dim·block_size (the full matrix,
    as is conventional, although causal attention needs half).
    """
    c = model.config
    lookup_only = 0 if c.tie_embeddings else model.tok_embeddings.weight.numel()  # the input embedding is a lookup
    if model.pos_embeddings is not None:
        lookup_only += model.pos_embeddings.weight.numel()
    return 6 * (model.num_params() - lookup_only) + 12 * c.n_layer * c.n_head * c.head_dim * c.block_size

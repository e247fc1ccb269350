"""Optimizers and schedules: Muon against a float64 reference of its definition, Newton–Schulz
against the polynomial it applies to each singular value, which parameters each optimizer gets,
the schedules' values, settings re-applied after a restore, state through
torch.distributed.checkpoint (one process, and 2-process FSDP resharded both ways), and loss
going down with each recipe."""
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import fully_shard

from llm.config import TrainConfig
from llm.train.distributed import setup, teardown
from llm.train.optim import Muon, lr_multiplier, make_optimizers, newton_schulz, set_hyperparameters
from tests.helpers import tiny_model

ROOT = Path(__file__).resolve().parent.parent
A, B, C = 3.4445, -4.7750, 2.0315  # the published quintic coefficients
SHAPES = [(24, 24), (40, 16), (16, 40), (17, 123), (123, 17)]  # square, tall, wide, odd

# DCP says it assumes a single process when there is no process group: that is intended here.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny tensors gain nothing from threads, and on a busy machine every parallel region waits
    for a descheduled thread (measured: 5 ms with one thread, 7 s with two for the same test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- Muon against its definition ---------------------------------------------------------------

def orthogonalize_reference(m: torch.Tensor) -> torch.Tensor:
    """Five quintic Newton–Schulz steps X ← aX + b(XXᵀ)X + c(XXᵀ)²X from m/(‖m‖_F + 1e-7), in float64
    (the published epsilon matters at 1e-7: the quintic's slope amplifies small singular values)."""
    x = m.double() / (m.double().norm() + 1e-7)
    if x.shape[0] > x.shape[1]:
        return orthogonalize_reference(m.T).T
    for _ in range(5):
        x = A * x + B * (x @ x.T) @ x + C * (x @ x.T) @ (x @ x.T) @ x
    return x


def muon_reference(weight, grads, lr, momentum, weight_decay):
    """Muon as published (the momentum as an average), in float64, yielding the weights after each step."""
    w = weight.double().clone()
    buffer = torch.zeros_like(w)
    rows, cols = w.shape
    for g in grads:
        g = g.double()
        buffer = momentum * buffer + (1 - momentum) * g
        nesterov = (1 - momentum) * g + momentum * buffer
        update = orthogonalize_reference(nesterov)
        w = w * (1 - lr * weight_decay) - lr * math.sqrt(max(1, rows / cols)) * update
        yield w


# Of the largest change. float32: measured up to 3.2e-5 (square matrices' small singular values
# amplify rounding, and the weights hold the change to 2^-24 of their own size).
@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-10), (torch.float32, 1e-4)])
@pytest.mark.parametrize("steps", [1, 4])
def test_muon_matches_float64_reference(dtype, tolerance, steps, seed):
    weights = [torch.nn.Parameter(torch.randn(shape, dtype=dtype)) for shape in SHAPES]
    grads = [[torch.randn(shape, dtype=dtype) for _ in range(steps)] for shape in SHAPES]
    lr, momentum, weight_decay = 0.02, 0.9 + 0.09 * torch.rand(()).item(), 0.1
    references = [list(muon_reference(w.detach(), g, lr, momentum, weight_decay)) for w, g in zip(weights, grads)]
    initial = [w.detach().double().clone() for w in weights]
    optimizer = Muon(weights, lr=lr, momentum=momentum, weight_decay=weight_decay, ns_dtype=dtype)
    for step in range(steps):
        for w, g in zip(weights, grads):
            w.grad = g[step]
        optimizer.step()
        for w, w0, ref in zip(weights, initial, references):
            # Compare the change of the weights, not the weights: that is what Muon computes.
            expected = ref[step] - w0
            torch.testing.assert_close(w.detach().double() - w0, expected, rtol=0,
                                       atol=tolerance * expected.abs().max().item(),
                                       msg=f"{tuple(w.shape)} step {step}")


def quintic(s: torch.Tensor) -> torch.Tensor:
    return A * s + B * s**3 + C * s**5


@pytest.mark.parametrize("shape", SHAPES)
def test_newton_schulz_maps_each_singular_value_through_the_quintic(shape, seed):
    """NS(G) = U·p⁵(S/‖G‖_F)·Vᵀ for G = U·S·Vᵀ: the iteration keeps the singular vectors and
    applies the polynomial to each singular value."""
    g = torch.randn(shape, dtype=torch.float64)
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    mapped = s / (g.norm() + 1e-7)
    for _ in range(5):
        mapped = quintic(mapped)
    torch.testing.assert_close(newton_schulz(g, dtype=torch.float64), u @ torch.diag(mapped) @ vh, rtol=0, atol=1e-10)


@pytest.mark.parametrize("shape", [(64, 16), (16, 64), (40, 120), (200, 50)])
def test_newton_schulz_is_nearly_orthogonal(shape, seed):
    """On well-conditioned matrices (random, aspect ratio ≥ 3) five float32 steps put every singular
    value in the band the quintic settles in, about [0.68, 1.13] ⊂ [0.6, 1.2]; exactly UVᵀ would be 1."""
    g = torch.randn(shape) * 10 ** (4 * torch.rand(()).item() - 2)  # any scale
    s = torch.linalg.svdvals(newton_schulz(g).double())
    assert s.min() > 0.6 and s.max() < 1.2, s


# --- which parameters each optimizer gets --------------------------------------------------------

def names_by_optimizer(model, optimizers) -> dict:
    name = {id(p): n for n, p in model.named_parameters()}
    return {type(o).__name__: sorted(name[id(p)] for g in o.param_groups for p in g["params"]) for o in optimizers}


@pytest.mark.parametrize("options", [dict(tie_embeddings=True), dict(tie_embeddings=False, bias=True, norm="layernorm"),
                                     dict(pos_embedding="learned", ffn="gelu")])
def test_muon_gets_the_block_matrices_and_adamw_the_rest(options):
    model = tiny_model(dtype=torch.float32, **options)
    names = names_by_optimizer(model, make_optimizers(model, TrainConfig(optimizer="muon"), torch.device("cpu")))
    matrices = [n for n, p in model.named_parameters() if n.startswith("layers.") and p.dim() == 2]
    assert names["Muon"] == sorted(matrices)
    assert all(n.split(".")[-2] in ("wqkv", "wo", "w1", "w2", "w3") for n in matrices)
    assert names["AdamW"] == sorted(n for n, _ in model.named_parameters() if n not in matrices)
    assert "tok_embeddings.weight" in names["AdamW"]
    assert ("output.weight" in names["AdamW"]) == (model.output is not None)
    adamw = make_optimizers(model, TrainConfig(optimizer="adamw"), torch.device("cpu"))
    assert names_by_optimizer(model, adamw) == {"AdamW": sorted(n for n, _ in model.named_parameters())}


def test_newton_schulz_iterates_in_the_runs_compute_dtype():
    model, cpu = tiny_model(dtype=torch.float32), torch.device("cpu")
    cfg = TrainConfig(optimizer="muon")
    assert make_optimizers(model, cfg, cpu)[1].ns_dtype == torch.float32
    assert make_optimizers(model, cfg, cpu, torch.bfloat16)[1].ns_dtype == torch.bfloat16


def test_weight_decay_only_on_two_dimensional_adamw_parameters():
    model = tiny_model(dtype=torch.float32, tie_embeddings=False, bias=True)
    cfg = TrainConfig(optimizer="muon", weight_decay=0.3)
    for optimizer in make_optimizers(model, cfg, torch.device("cpu")):
        for group in optimizer.param_groups:
            assert group["weight_decay"] == (0.3 if group["params"][0].dim() == 2 else 0.0)
            assert len({p.dim() == 2 for p in group["params"]}) == 1


# --- schedules ---------------------------------------------------------------------------------------

def test_cosine_schedule():
    cfg = TrainConfig(schedule="cosine", warmup_steps=10, max_steps=110, min_lr_ratio=0.1)
    m = lambda step: lr_multiplier(step, cfg)
    assert m(0) == pytest.approx(0.1) and m(4) == pytest.approx(0.5) and m(9) == pytest.approx(1.0)
    assert m(10) == pytest.approx(1.0)  # warmup done: the decay starts from the peak
    assert m(60) == pytest.approx(0.55)  # halfway: the mean of peak and floor
    assert m(35) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi / 4)) / 2)
    assert m(110) == pytest.approx(0.1) and m(500) == pytest.approx(0.1)
    assert all(m(s) >= m(s + 1) for s in range(10, 120))
    assert lr_multiplier(0, TrainConfig(warmup_steps=0, max_steps=50)) == pytest.approx(1.0)
    short = TrainConfig(warmup_steps=10, max_steps=1000, decay_steps=30, min_lr_ratio=0.0)
    assert lr_multiplier(20, short) == pytest.approx(0.5) and lr_multiplier(999, short) == 0.0


def test_wsd_schedule():
    cfg = TrainConfig(schedule="wsd", warmup_steps=10, max_steps=100, cooldown_fraction=0.2, min_lr_ratio=0.0)
    m = lambda step: lr_multiplier(step, cfg)
    assert m(0) == pytest.approx(0.1) and m(9) == pytest.approx(1.0)
    assert all(m(s) == 1.0 for s in range(10, 81))  # stable until the last 20% of 100 steps
    assert m(90) == pytest.approx(0.5) and m(99) == pytest.approx(0.05)
    assert m(100) == 0.0 and m(150) == 0.0
    floor = TrainConfig(schedule="wsd", warmup_steps=0, max_steps=1000, decay_steps=200, cooldown_fraction=0.5,
                        min_lr_ratio=0.2)
    assert lr_multiplier(150, floor) == pytest.approx(0.6) and lr_multiplier(500, floor) == pytest.approx(0.2)
    # a cooldown that starts inside the warmup: the smaller of the two
    overlap = TrainConfig(schedule="wsd", warmup_steps=10, max_steps=20, cooldown_fraction=0.9, min_lr_ratio=0.0)
    assert lr_multiplier(4, overlap) == pytest.approx(0.5) and lr_multiplier(11, overlap) == pytest.approx(9 / 18)
    no_cooldown = TrainConfig(schedule="wsd", warmup_steps=0, max_steps=10, cooldown_fraction=0.0)
    assert [lr_multiplier(s, no_cooldown) for s in range(10)] == [1.0] * 10


# --- state through torch.distributed.checkpoint ---------------------------------------------------------

def save_state(path: Path, model, optimizers):
    dcp.save({"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizers)},
             checkpoint_id=path)


def load_state(path: Path, model, optimizers):
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, optimizers)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizers, state["optim"])


def train_steps(model, optimizers, cfg, tokens, steps):
    for step in steps:
        set_hyperparameters(optimizers, cfg, lr_multiplier(step, cfg))
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def full_weights(model) -> dict:
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.clone() for k, v in sd.items()}


def test_state_round_trip_through_dcp(tmp_path, seed):
    """Muon's momentum and AdamW's moments survive save/load: the next step equals the uninterrupted one."""
    cfg = TrainConfig(optimizer="muon", lr=3e-3, warmup_steps=2, max_steps=6)
    tokens = torch.randint(0, 97, (3, 17))
    model = tiny_model(seed, dtype=torch.float32, tie_embeddings=False).train()
    optimizers = make_optimizers(model, cfg, torch.device("cpu"))
    train_steps(model, optimizers, cfg, tokens, range(3))
    save_state(tmp_path / "state", model, optimizers)

    restored = tiny_model(seed + 1, dtype=torch.float32, tie_embeddings=False).train()  # other weights
    restored_optimizers = make_optimizers(restored, cfg, torch.device("cpu"))
    load_state(tmp_path / "state", restored, restored_optimizers)
    for before, after in zip(optimizers, restored_optimizers):
        for p, q in zip((p for g in before.param_groups for p in g["params"]),
                        (q for g in after.param_groups for q in g["params"])):
            assert before.state[p].keys() == after.state[q].keys()
            for key, value in before.state[p].items():
                assert torch.equal(value, after.state[q][key]), key
    train_steps(model, optimizers, cfg, tokens, range(3, 5))
    train_steps(restored, restored_optimizers, cfg, tokens, range(3, 5))
    for name, value in full_weights(model).items():
        assert torch.equal(value, full_weights(restored)[name]), name


def test_hyperparameters_follow_the_config_after_a_restore(tmp_path, seed):
    """The saved groups carry the old run's settings; set_hyperparameters replaces them with the current ones."""
    old = TrainConfig(optimizer="muon", lr=1e-3, muon_lr=0.05, muon_momentum=0.8, weight_decay=0.0,
                      beta1=0.8, beta2=0.9)
    new = TrainConfig(optimizer="muon", lr=4e-3, muon_lr=0.01, muon_momentum=0.95, weight_decay=0.2,
                      beta1=0.85, beta2=0.99)
    tokens = torch.randint(0, 97, (2, 9))
    model = tiny_model(seed, dtype=torch.float32).train()
    optimizers = make_optimizers(model, old, torch.device("cpu"))
    train_steps(model, optimizers, old, tokens, range(2))
    save_state(tmp_path / "state", model, optimizers)

    resumed = make_optimizers(model, new, torch.device("cpu"))
    load_state(tmp_path / "state", model, resumed)
    muon, adamw = resumed[1], resumed[0]
    assert muon.param_groups[0]["momentum"] == 0.8  # restored from the old run...
    set_hyperparameters(resumed, new, 0.5)  # ...until the current settings are applied
    assert muon.param_groups[0]["lr"] == pytest.approx(0.005)
    assert muon.param_groups[0]["momentum"] == 0.95 and muon.param_groups[0]["weight_decay"] == 0.2
    decay, no_decay = adamw.param_groups
    assert decay["lr"] == no_decay["lr"] == pytest.approx(2e-3)
    assert decay["betas"] == no_decay["betas"] == (0.85, 0.99)
    assert decay["weight_decay"] == 0.2 and no_decay["weight_decay"] == 0.0


# --- 2-process FSDP: the same updates, and state resharded both ways ---------------------------------------

FSDP_CFG = TrainConfig(optimizer="muon", lr=3e-3, muon_lr=0.02, warmup_steps=2, max_steps=8, weight_decay=0.1)
FSDP_SCRIPT = """
import sys
from pathlib import Path
from llm.train.distributed import exit_process
from tests.test_optim import fsdp_worker

fsdp_worker(int(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]) if len(sys.argv) > 3 else None)
exit_process(0)  # as train.py's workers end: no interpreter teardown under FSDP2 (llm/train/distributed.py)
"""


def fsdp_worker(seed: int, out: Path, resume_from: Path | None = None):
    """3 steps (weights3), save the state, 1 more step (weights4); with resume_from, a fresh model
    and optimizers load that state and take the 4th step (weights4_resumed). Every process
    takes its own rows of one global batch; without torchrun one process takes them all.

    float64 throughout (weights, gradient reduction, Newton–Schulz): then the one difference
    between world sizes, the order in which gradients are summed, stays near 1e-16 instead of
    being amplified from float32's 1e-7 by Newton–Schulz and Adam to about 1e-5 of the
    change; measured in float64: at most 2e-14.
    """
    d = setup("cpu")
    try:
        tokens = torch.randint(0, 97, (4, 17), generator=torch.Generator().manual_seed(seed))
        tokens = tokens.chunk(d.world_size)[d.rank]

        def build():
            # Unevenly sharded: 75 FFN rows and 97 vocabulary rows on 2 processes.
            model = tiny_model(seed, dtype=torch.float64, ffn_hidden=75, tie_embeddings=False).train()
            if d.enabled:  # as llm.train.distributed.parallelize, but reducing gradients in float64
                for block in model.layers:
                    fully_shard(block)
                fully_shard(model)
            optimizers = make_optimizers(model, FSDP_CFG, d.device)
            optimizers[-1].ns_dtype = torch.float64
            return model, optimizers

        def save(name, model):
            weights = full_weights(model)
            if d.is_main:
                torch.save(weights, out / f"{name}.pt")

        model, optimizers = build()
        save("weights0", model)
        train_steps(model, optimizers, FSDP_CFG, tokens, range(3))
        save("weights3", model)
        save_state(out / "state", model, optimizers)
        train_steps(model, optimizers, FSDP_CFG, tokens, range(3, 4))
        save("weights4", model)
        if resume_from is not None:
            model, optimizers = build()
            load_state(resume_from / "state", model, optimizers)
            train_steps(model, optimizers, FSDP_CFG, tokens, range(3, 4))
            save("weights4_resumed", model)
    finally:
        teardown()


def assert_same_updates(a: dict, b: dict, initial: dict):
    """Weights a and b moved the same way from `initial` (to 1e-9 of the largest change)."""
    assert a.keys() == b.keys()
    for name in a:
        change_a, change_b = a[name] - initial[name], b[name] - initial[name]
        torch.testing.assert_close(change_a, change_b, rtol=0, atol=1e-9 * change_b.abs().max().item(), msg=name)


def test_fsdp_two_processes_update_like_one_and_state_reshards(tmp_path, seed):
    one, two, back = tmp_path / "one", tmp_path / "two", tmp_path / "back"
    for path in (one, two, back):
        path.mkdir()
    fsdp_worker(seed, one)
    script = tmp_path / "fsdp_muon.py"
    script.write_text(FSDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(seed), str(two), str(one)],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (two / "state" / "__1_0.distcp").exists()  # the second process wrote its own shard
    fsdp_worker(seed, back, resume_from=two)

    load = lambda path, name: torch.load(path / f"{name}.pt")
    initial = load(one, "weights0")
    assert_same_updates(load(two, "weights0"), initial, initial)
    assert_same_updates(load(two, "weights3"), load(one, "weights3"), initial)
    assert_same_updates(load(two, "weights4"), load(one, "weights4"), initial)
    assert_same_updates(load(two, "weights4_resumed"), load(one, "weights4"), initial)  # saved by 1, loaded by 2
    assert_same_updates(load(back, "weights4_resumed"), load(one, "weights4"), initial)  # saved by 2, loaded by 1


# --- Newton–Schulz shared out among the ranks -------------------------------------------------------------

# Uneven rows on 2 ranks, a matrix with fewer rows than ranks (one rank holds none), an odd count.
SHARDED_SHAPES = [(75, 32), (97, 16), (3, 40), (1, 8), (16, 16)]
SHARDED_SCRIPT = """
import sys
from pathlib import Path
from llm.train.distributed import exit_process
from tests.test_optim import sharded_muon_worker

sharded_muon_worker(int(sys.argv[1]), Path(sys.argv[2]))
exit_process(0)  # as train.py's workers end: no interpreter teardown under FSDP2 (llm/train/distributed.py)
"""


def sharded_muon_worker(seed: int, out: Path):
    """Two Muon steps on weights split by rows over the ranks (plain tensors without torchrun), in
    float64; saves the final weights and the shapes this process ran Newton–Schulz on."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    from llm.train import optim

    d = setup("cpu")
    try:
        generator = torch.Generator().manual_seed(seed)
        weights = [torch.randn(shape, dtype=torch.float64, generator=generator) for shape in SHARDED_SHAPES]
        grads = [[torch.randn(shape, dtype=torch.float64, generator=generator) for shape in SHARDED_SHAPES]
                 for _ in range(2)]
        mesh = init_device_mesh("cpu", (d.world_size,)) if d.enabled else None
        shard = (lambda t: distribute_tensor(t, mesh, [Shard(0)])) if d.enabled else (lambda t: t)
        params = [torch.nn.Parameter(shard(w)) for w in weights]
        muon = Muon(params, lr=0.02, momentum=0.9, weight_decay=0.1, ns_dtype=torch.float64)
        ran, newton_schulz = [], optim.newton_schulz
        optim.newton_schulz = lambda x, **kw: ran.append(tuple(x.shape)) or newton_schulz(x, **kw)
        try:
            for step_grads in grads:
                for p, g in zip(params, step_grads):
                    p.grad = shard(g)
                muon.step()
        finally:
            optim.newton_schulz = newton_schulz
        final = [p.detach().full_tensor() if d.enabled else p.detach() for p in params]
        torch.save({"weights": final, "ran": ran}, out / f"rank{d.rank}.pt")
    finally:
        teardown()


def test_muon_shares_newton_schulz_out_among_ranks(tmp_path, seed):
    """On 2 processes each rank orthogonalizes every other matrix, whole, and both end with the
    weights of one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    sharded_muon_worker(seed, one)
    script = tmp_path / "sharded_muon.py"
    script.write_text(SHARDED_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                             str(script), str(seed), str(two)], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reference = torch.load(one / "rank0.pt")
    assert reference["ran"] == SHARDED_SHAPES * 2
    for rank in (0, 1):
        shared = torch.load(two / f"rank{rank}.pt")
        assert shared["ran"] == [s for i, s in enumerate(SHARDED_SHAPES) if i % 2 == rank] * 2  # its share, whole
        for got, expected in zip(shared["weights"], reference["weights"]):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)


# --- training ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_loss_decreases(optimizer, seed):
    cfg = TrainConfig(optimizer=optimizer, lr=1e-2, muon_lr=0.02, warmup_steps=5, max_steps=40)
    model = tiny_model(seed, dtype=torch.float32).train()
    optimizers = make_optimizers(model, cfg, torch.device("cpu"))
    tokens = torch.randint(0, 97, (8, 33))
    with torch.no_grad():
        initial = model(tokens[:, :-1], tokens[:, 1:]).item()
    train_steps(model, optimizers, cfg, tokens, range(cfg.max_steps))
    with torch.no_grad():
        final = model(tokens[:, :-1], tokens[:, 1:]).item()
    assert initial == pytest.approx(math.log(97), rel=0.05)
    assert final < 0.5 * initial, (initial, final)

"""Weights for decoding: each linear layer in the format a one-token step reads fastest.

Decoding reads every weight once per token, so its speed is memory bandwidth: how fast the
matrix-vector products stream their weights. `for_decoding` picks a format per layer:

- float, for a step compiled by inductor on CPU at batch 1 (`compile_backend="inductor"`,
  `batch_size=1`): the weight stays (out, in), and one row's product is written as a sum over the
  input dimension (`streamed_product`), from which inductor generates one loop per output channel,
  fused with the rest of the step. It streams the weights at about the machine's read bandwidth,
  which oneDNN's and MKL's matrix-vector products fall short of at small models' widths
  (docs/decoding.md). Other row counts (the prefill)
  take F.linear. A tied head shares the embedding's matrix: no copy. At 8 rows these sums are
  slower than oneDNN (each output's chain of additions waits on the previous one), so batches
  keep the packed format below.
- float on CPU otherwise (fp32, and bf16 where the CPU has it): packed once into oneDNN's blocked
  layout and multiplied by oneDNN, the fastest eager kernel there (fp32 only for matrices of 2 MB
  and more: a oneDNN call costs about 15 us more). A compiled step reaches the packed weight, an
  opaque tensor, through a custom op (`llm_toolkit::packed_linear`) by a key, a graph constant.
- float elsewhere: stored transposed, (in, out): y = x @ Wᵀ reads it as one contiguous stream.
- int8 (`quantize="int8"`), a quarter of fp32's bytes: per output channel, q = round(w / s),
  s = max|w| / 127, y = (x @ qᵀ) · s + bias. Eagerly on CPU, PyTorch's int8 weight-only kernel
  (aten._weight_int8pack_mm), fast with bf16 activations only (several times slower with fp32 ones), so
  activations go through it in bf16; it needs the input width to be a multiple of 16, other
  widths and devices convert the weight inside the matmul. In a step compiled by inductor on CPU,
  one row is the streamed sum in fp32, each int8 converted as it is read: faster than the kernel
  at one row, slower at 8. So a row decoded alone by a compiled step is computed in fp32, rows of
  a batch in bf16: the two can differ slightly.
- int4 (`quantize="int4"`, CPU only), an eighth of fp32's bytes plus a scale and low per group of
  INT4_GROUP_SIZE inputs: w ≈ q · scale + low, q in 0..15 (the group's min and max map to 0 and
  15). Two kernels, eager and compiled alike. Ours (llm/infer/int4_kernel.py), where the CPU has
  AVX512-VNNI and the kernel builds: fp16 scale and low, and the activations quantized to int8 per
  32 inputs as llama.cpp's q8_0 does, so that each 64 weights take one integer dot-product
  instruction instead of a conversion and a multiply-add per 16 (1.4-1.9x PyTorch's kernel at one
  row, a whole SmolLM2-sized step 1.4x). Otherwise PyTorch's CPU int4 kernel
  (quantized::int4mm_packed_weight_cpu, aten._weight_int4pack_mm_for_cpu's entry with the group
  size as a tensor; bf16 scale and offset = low + 8 · scale) with bf16 activations (far slower with
  fp32 ones). An inductor loop that unpacks the 4-bit pairs itself is slower than either (its
  per-weight arithmetic, not the memory, is the limit). Layers whose shapes PyTorch's kernel
  cannot take (inputs not a multiple of the group size, outputs not a multiple of 16) are int8
  instead, as llama.cpp's quantizer falls back for shapes its formats do not fit; of the others,
  ours takes those whose inputs are a multiple of 64.

The output head is converted too (with tied embeddings, a converted copy of the embedding, except
in the streamed float format, which shares it; the lookup stays as it is), and SwiGLU's gate and
up projections become one stacked layer (llm.model.FeedForward). On CPU the weights are then
moved into memory backed by 2 MB pages (llm/infer/hugepages.py).
"""
import itertools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.errors import UserError
from llm.infer import int4_kernel
from llm.infer.hugepages import into_huge_pages

METHODS = ("int8", "int4")
KERNEL_DTYPE = torch.bfloat16  # activations through PyTorch's int8 and int4 CPU kernels
# The smallest weight worth packing for oneDNN. fp32: its break-even against MKL at batch 1 (a
# oneDNN call costs more to start); bf16: every size, MKL's bf16 products being slower.
MIN_PACKED_BYTES = {torch.float32: 1 << 21, torch.bfloat16: 0}
INT4_GROUP_SIZE = 32  # inputs per scale and offset, as llama.cpp's Q4_0 blocks


def streams(flat: torch.Tensor) -> bool:
    """Whether a product of these (rows, in) activations is traced as a streamed sum: one row on
    CPU, under torch.compile."""
    return torch.compiler.is_compiling() and flat.device.type == "cpu" and flat.size(0) == 1


def streamed_product(row: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """(1, in) x (out, in)ᵀ -> (1, out) in fp32, as a sum over `in` for each output channel, the
    weight converted to fp32 element by element inside the loop inductor generates."""
    return (row.float() * weight.float()).sum(-1)[None]


class TransposedLinear(nn.Module):
    """A float linear layer whose weight is stored transposed, (in, out), and an optional bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight_t", weight.detach().t().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


class StreamedLinear(nn.Module):
    """A float linear layer for steps compiled by inductor on CPU at batch 1: the weight (out, in) as
    it is (shared, not copied), one row as a streamed sum, more rows through F.linear."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight", weight.detach())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        if not streams(flat):
            return F.linear(x, self.weight, self.bias)
        y = streamed_product(flat, self.weight).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        return weight.device.type == "cpu" and weight.is_floating_point()


class PackedLinear(nn.Module):
    """A float linear layer whose weight is packed for oneDNN (CPU only), and an optional bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features = weight.size(0)
        # The layout oneDNN picks for a given number of rows; 1 is a decode step at batch 1.
        self.register_buffer("weight_packed", torch.ops.mkldnn._reorder_linear_weight(weight.detach(), 1))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register()

    def register(self):
        """Give this layer its own key, by which a compiled step finds it."""
        self.key = next(_KEYS)
        _PACKED[self.key] = self

    def __setstate__(self, state):  # a copy.copy is a layer of its own, with its own key (deepcopy
        # cannot copy oneDNN's tensors at all)
        super().__setstate__(state)
        self.register()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return packed_linear(x, self.key, self.out_features, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.weight_packed, self.bias, "none", [], "")

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        if weight.dtype == torch.bfloat16:
            return torch.ops.mkldnn._is_mkldnn_bf16_supported()
        return weight.dtype == torch.float32

    @staticmethod
    def pays(weight: torch.Tensor) -> bool:
        """Packing is possible here and faster for this weight."""
        return PackedLinear.supports(weight) and weight.nbytes >= MIN_PACKED_BYTES[weight.dtype]


_KEYS = itertools.count()
_PACKED = weakref.WeakValueDictionary()  # key -> PackedLinear, for as long as the layer exists


@torch.library.custom_op("llm_toolkit::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, key: int, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    """PackedLinear's product, as compiled code calls it: one extern call on the layer's packed weight."""
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[key].weight_packed, bias, "none", [], "")


@packed_linear.register_fake
def _(x, key, out_features, bias):
    return x.new_empty(*x.shape[:-1], out_features)


class Int8Linear(nn.Module):
    """A linear layer with int8 weights (out, in), one scale per output channel, and an optional bias.
    streamed: under inductor on CPU, compute one row as a streamed sum in fp32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, streamed: bool = False):
        super().__init__()
        self.streamed = streamed
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight", (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(weight.dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("kernel_scales", scales.to(KERNEL_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        if self.streamed and streams(flat):
            y = (streamed_product(flat, self.weight) * self.scales.float()).to(x.dtype)
        elif x.device.type == "cpu" and x.size(-1) % 16 == 0:
            y = torch.ops.aten._weight_int8pack_mm(flat.to(KERNEL_DTYPE), self.weight, self.kernel_scales).to(x.dtype)
        else:
            y = F.linear(flat, self.weight.to(x.dtype)) * self.scales.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer computes with, in float32."""
        return self.weight.float() * self.scales.float()[:, None]


class Int4Linear(nn.Module):
    """A linear layer with 4-bit weights, a scale and low per group of `group_size` inputs of each
    output channel, and an optional bias (see the module doc). kernel: "vnni" (ours,
    llm/infer/int4_kernel.py: fp16 scale and low, activations quantized to int8 per 32 inputs) or
    "pytorch" (PyTorch's CPU int4 layout: bf16 scale and offset, bf16 activations); by default ours
    where it is built and takes the shape."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, group_size: int = INT4_GROUP_SIZE,
                 kernel: str | None = None):
        super().__init__()
        if not Int4Linear.supports(weight, group_size):
            raise ValueError(f"int4 needs a CPU weight with inputs a multiple of {group_size} and outputs of 16, "
                             f"got {tuple(weight.shape)} on {weight.device}")
        ours = group_size == int4_kernel.GROUP and int4_kernel.supports(weight) and int4_kernel.available()
        if kernel is None:
            kernel = "vnni" if ours else "pytorch"
        elif kernel not in ("vnni", "pytorch"):
            raise ValueError(f"int4 kernel {kernel!r}: vnni or pytorch")
        elif kernel == "vnni" and not ours:
            raise ValueError(f"int4 kernel vnni: not for this weight or machine ({int4_kernel.status()})")
        self.kernel, self.group_size = kernel, group_size
        out, width = weight.shape
        groups = weight.detach().float().view(out, width // group_size, group_size)
        low, high = groups.amin(-1), groups.amax(-1)
        scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
        if kernel == "vnni":  # q from the fp16 scale and low the kernel reads
            scale, low = scale.half(), low.half()
            step = scale.float().clamp(min=torch.finfo(torch.float32).tiny)
            q = ((groups - low.float()[..., None]) / step[..., None]).round().clamp(0, 15)
            self.register_buffer("weight", int4_kernel.pack(q.view(out, width)))
            self.register_buffer("scale", scale)
            self.register_buffer("low", low)
        else:
            q = ((groups - low[..., None]) / scale[..., None]).round().clamp(0, 15)
            offset = low + 8 * scale  # (q - 8) · scale + offset: low at q = 0
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.view(out, width).int(), 1)
            self.register_buffer("weight", packed)
            # (groups, out, 2): the kernel's layout, in the dtype of its activations
            scales_and_offsets = torch.stack([scale.t(), offset.t()], -1).to(KERNEL_DTYPE).contiguous()
            self.register_buffer("scales_and_offsets", scales_and_offsets)
            # The kernel's entry that takes the group size as a tensor: a step compiled ahead of time
            # then reads this buffer, where the int entry's lowering makes a constant of its own that a
            # package without constants lacks (llm/infer/aot.py). One element, not a 0-d tensor, which
            # inductor would also turn into a constant.
            self.register_buffer("group_size_tensor", torch.tensor([group_size]))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        if self.kernel == "vnni":
            y = int4_kernel.int4_mm(flat, self.weight, self.scale, self.low)
        else:
            flat = flat.to(KERNEL_DTYPE).contiguous()  # the kernel reads rows densely
            y = torch.ops.quantized.int4mm_packed_weight_cpu(flat, self.weight, self.group_size_tensor,
                                                             self.scales_and_offsets)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], -1)

    def dequantized(self) -> torch.Tensor:
        """The weight this layer computes with, in float32."""
        if self.kernel == "vnni":
            q = int4_kernel.unpack(self.weight).float()
            out, width = q.shape
            groups = q.view(out, width // self.group_size, self.group_size)
            return (groups * self.scale.float()[..., None] + self.low.float()[..., None]).view(out, width)
        eye = torch.eye(self.weight.size(1) * 2)  # recovered through the kernel itself: in fp32 it rounds nothing
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size,
                                                          self.scales_and_offsets.float()).t().contiguous()

    @staticmethod
    def supports(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> bool:
        """Whether PyTorch's kernel takes the shape (ours takes fewer, and falls back to it)."""
        out, width = weight.shape
        return weight.device.type == "cpu" and width % group_size == 0 and out % 16 == 0


def for_decoding(model: nn.Module, quantize: str | None = None, compile_backend: str | None = None,
                 batch_size: int | None = None) -> nn.Module:
    """Every linear layer of a Transformer, and its output head, in a decoding format (in place):
    float (streamed, packed for oneDNN, or transposed), int8 or int4 (see the module doc).
    compile_backend: the torch.compile backend the decode step will run under, if any; batch_size:
    the rows it will decode at, if known (float weights are streamed for inductor at batch 1 only).
    Eager steps, and any batch size, run either way. For inference only: the model no longer trains."""
    if quantize is not None:
        check_method(quantize, next(model.parameters()).device)
    streamed = compile_backend == "inductor"

    def convert(weight, bias=None):
        if quantize == "int4" and Int4Linear.supports(weight):
            return Int4Linear(weight, bias)
        if quantize in ("int8", "int4"):
            return Int8Linear(weight, bias, streamed=streamed)
        if streamed and batch_size == 1 and StreamedLinear.supports(weight):
            return StreamedLinear(weight, bias)
        if PackedLinear.pays(weight):
            return PackedLinear(weight, bias)
        return TransposedLinear(weight, bias)

    for block in model.layers:  # SwiGLU's gate and up projections, stacked: one product instead of two
        ffn = block.feed_forward
        if ffn.w3 is not None:
            bias = None if ffn.w1.bias is None else torch.cat([ffn.w1.bias, ffn.w3.bias])
            ffn.w13 = convert(torch.cat([ffn.w1.weight, ffn.w3.weight]), bias)
            ffn.w1 = ffn.w3 = None
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.Linear):
                setattr(module, name, convert(child.weight, child.bias))
    if model.output is None:  # tied: the head gets its own converted copy of the embedding (or shares it)
        model.output = convert(model.tok_embeddings.weight)
    into_huge_pages(model)  # on CPU: streamed through 2 MB pages, fewer TLB misses (llm/infer/hugepages.py)
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    return for_decoding(model, "int8")


def check_method(method: str, device: torch.device | str = "cpu"):
    if method not in METHODS:
        raise UserError(f"--quantize {method}: not supported (int8: one scale per output channel; "
                        f"int4: a scale and offset per {INT4_GROUP_SIZE} inputs; both weight-only)")
    if method == "int4" and torch.device(device).type != "cpu":
        raise UserError("--quantize int4: CPU only (its kernels are CPU ones); use int8 on this device")


def describe(method: str | None) -> str:
    """A method as a command prints it at start: int4 with the kernel it takes here, and why."""
    return f"int4, kernel {int4_kernel.status()}" if method == "int4" else str(method)


def bytes_per_step(model, batch: int, cache_len: int) -> int:
    """What one decode step reads: every weight of the layers and the head (not the embedding table,
    one row of which is read, unless it is the tied head), and the whole static KV cache."""
    kinds = (nn.Linear, TransposedLinear, PackedLinear, StreamedLinear, Int8Linear, Int4Linear, nn.RMSNorm, nn.LayerNorm)
    weights = sum(t.nbytes for m in model.modules() if isinstance(m, kinds)
                  for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)] if t is not None)
    if model.output is None:
        weights += model.tok_embeddings.weight.nbytes
    c = model.config
    dtype = next(model.parameters()).dtype
    cache = 2 * c.n_layer * batch * c.n_kv_head * cache_len * c.head_dim * dtype.itemsize
    return weights + cache

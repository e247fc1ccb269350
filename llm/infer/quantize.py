"""Weights for decoding: each linear layer in the format a one-token step reads fastest.

Decoding reads every weight once per token, so its speed is memory bandwidth, and how fast the
matrix-vector products stream their weights. The formats, chosen by `for_decoding`:

- float on CPU (fp32, and bf16 where the CPU has it): packed once into oneDNN's own blocked
  layout and multiplied by oneDNN (the kernels PyTorch's inductor uses for frozen CPU weights). On the
  2-core AVX-512 EPYC this was built on, a llama-small layer stack streamed its fp32 weights at
  1.1-1.6x the rate of MKL on the transposed layout at batch 1 and 3x at batch 8 (bf16: 1.3-1.7x).
  A oneDNN call costs about 15 us more, so in fp32 only matrices of 2 MB and more are packed. The
  packed weight is an opaque tensor that torch.compile cannot take as a graph input, so a compiled
  step reaches it through a custom op (`llm_toolkit::packed_linear`) by a key, a constant of the graph.
- float otherwise, stored transposed, (in, out): y = x @ Wᵀ reads it as one contiguous stream,
  1.3-1.4x faster than F.linear on the (out, in) layout at batch 1 on that EPYC (MKL 2024.2).
- int8 (`quantize="int8"`), a quarter of fp32's bytes: each output channel (row) w is stored as
  q = round(w / s), s = max|w| / 127 (symmetric, per channel), and the scale applies after the
  matmul: y = (x @ qᵀ) · s + bias. On CPU the matmul is PyTorch's own int8 weight-only kernel,
  aten._weight_int8pack_mm, which reads the int8 weights directly. Measured here it is fast with
  bf16 activations only (with fp32 or fp16 ones it is 6-7x slower), so activations go through it
  in bf16, which moves an fp32 model's logits about as much as the quantization does. It needs the
  input width to be a multiple of 16 (other widths crash it); other widths, and other devices,
  convert the weight inside the matmul (which torch.compile fuses on GPU). On CPU, a step compiled
  by inductor (`compile_backend="inductor"`) computes x · q at one row (batch 1) in fp32, as a
  reduction that inductor fuses with the conversion: it streams the int8 weights at 20-26 GB/s from
  memory on that EPYC, the kernel at 11-17 (at 8 rows the kernel is faster and stays). So compiled
  int8 rows at batch 1 are computed in fp32, in a batch in bf16: a row generated alone can differ
  slightly from the same row in a batch. Other backends would materialize the fp32 weights, so they
  keep the kernel. torchao 0.18's Int8WeightOnlyConfig, timed the same way as the kernel,
  dequantizes in eager mode and was 3-5x slower.

The output head is converted too (with tied embeddings, a converted copy; the lookup stays as it is),
and SwiGLU's gate and up projections become one stacked layer (llm.model.FeedForward).
"""
import itertools
import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F

from llm.errors import UserError

METHODS = ("int8",)
KERNEL_DTYPE = torch.bfloat16  # activations through aten._weight_int8pack_mm on CPU
# The smallest weight worth packing for oneDNN. fp32: the measured break-even against MKL at batch 1
# (1-4 MB matrices, default and llama-small shapes); bf16: every size, MKL's bf16 products being slower.
MIN_PACKED_BYTES = {torch.float32: 1 << 21, torch.bfloat16: 0}


class TransposedLinear(nn.Module):
    """A float linear layer whose weight is stored transposed, (in, out), and an optional bias."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.register_buffer("weight_t", weight.detach().t().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x @ self.weight_t
        return y if self.bias is None else y + self.bias


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
    fused_one_row: under inductor, compute one row as a reduction that inductor fuses (see above)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, fused_one_row: bool = False):
        super().__init__()
        self.fused_one_row = fused_one_row
        w = weight.detach().float()
        scales = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127
        self.register_buffer("weight", (w / scales[:, None]).round().clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scales.to(weight.dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.register_buffer("kernel_scales", scales.to(KERNEL_DTYPE))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))
        if self.fused_one_row and x.device.type == "cpu" and flat.size(0) == 1 and torch.compiler.is_compiling():
            # inductor fuses the conversion into one streaming reduction, which reads the int8 weights
            # about twice as fast as the kernel below on this CPU (at 8 rows it is slower)
            y = ((flat.float() * self.weight.float()).sum(-1) * self.scales.float()).to(x.dtype)[None]
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


def for_decoding(model: nn.Module, quantize: str | None = None, compile_backend: str | None = None) -> nn.Module:
    """Every linear layer of a Transformer, and its output head, in a decoding format (in place):
    packed for oneDNN or transposed float, or int8 with quantize="int8". compile_backend: the
    torch.compile backend the decode step will run under, if any (eager steps run as well either
    way). For inference only: the model no longer trains."""
    if quantize is not None:
        check_method(quantize)

    def convert(weight, bias=None):
        if quantize == "int8":
            return Int8Linear(weight, bias, fused_one_row=compile_backend == "inductor")
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
    if model.output is None:  # tied: the head gets its own converted copy of the embedding
        model.output = convert(model.tok_embeddings.weight)
    return model


def quantize_int8(model: nn.Module) -> nn.Module:
    return for_decoding(model, "int8")


def check_method(method: str):
    if method not in METHODS:
        raise UserError(f"--quantize {method}: not supported (int8 only: weight-only, one scale per output channel)")

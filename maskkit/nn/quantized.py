"""int8 Linear layers: weights stored as int8 with one scale per output channel, activations quantized per token
as they arrive, the product in integer arithmetic (`maskkit compress --quantize int8`).

The scheme is torchao's `Int8DynamicActivationInt8WeightConfig` (symmetric absmax per output row for the weight,
per token for the activation, int32 accumulation; tests/efficiency/test_compress.py compares the two), written
out here in plain torch so that the int8 weights are ordinary tensors a safetensors checkpoint holds (torchao's
are tensor subclasses that safetensors cannot store) and a reader sees the arithmetic. On the CPU it is worth it
under `torch.compile`, which fuses the quantize / int matmul / rescale into a few kernels (Efficiency in the
README: eager it is slower than fp32).
"""

import torch
from torch import nn

INT8_MAX = 127      # symmetric: -127 .. 127, so that the scale maps the absmax exactly and 0 stays 0


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float -> (int8 values (N, K), float32 scales (N, 1)) with x ~= values * scales, absmax per row."""
    scale = x.detach().abs().amax(-1, keepdim=True).float().clamp_min(1e-12) / INT8_MAX
    values = torch.round(x.float() / scale).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return values, scale


class Int8Linear(nn.Module):
    """y = (q(x) s_x) (W_q s_W)^T + b: an int8 stand-in for nn.Linear, for inference (it has no trainable weight).

    Buffers: `weight_int8` (in, out), the transposed int8 weight (the layout the int8 matmul reads);
    `weight_scale` (out,), one float32 scale per output channel; `bias` (out,) float, or absent.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(in_features, out_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        quantized = cls(linear.in_features, linear.out_features, linear.bias is not None)
        values, scale = quantize_rows(linear.weight.detach().cpu())
        quantized.weight_int8 = values.t().contiguous().to(linear.weight.device)
        quantized.weight_scale = scale.squeeze(1).to(linear.weight.device)
        if linear.bias is not None:
            quantized.bias = linear.bias.detach().float().clone()
        return quantized

    @property
    def weight(self) -> torch.Tensor:
        """The weight this layer multiplies by, dequantized: (out, in) float32 (what code that reads
        `linear.weight` sees, e.g. the analysis tools and the export to Hugging Face)."""
        return self.weight_int8.t().float() * self.weight_scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        rows, x_scale = quantize_rows(x.reshape(-1, self.in_features))              # (N, in) int8, (N, 1)
        if rows.device.type == "cpu" or rows.shape[0] > 16:
            product = torch._int_mm(rows, self.weight_int8)                          # (N, out) int32
        else:       # CUDA's int8 matmul needs more than 16 rows; a float matmul of the same integers
            product = rows.float() @ self.weight_int8.float()
        y = product.float() * x_scale * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype).reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def quantize_linears(module: nn.Module) -> int:
    """Replace every nn.Linear inside `module` by its Int8Linear, in place; returns how many were replaced."""
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.Linear):
            setattr(module, name, Int8Linear.from_linear(child))
            count += 1
        else:
            count += quantize_linears(child)
    return count


def dequantized_linear(layer: Int8Linear) -> nn.Linear:
    """The nn.Linear that computes with this layer's int8 weights in float (for an export that has no int8)."""
    linear = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None)
    with torch.no_grad():
        linear.weight.copy_(layer.weight)
        if layer.bias is not None:
            linear.bias.copy_(layer.bias)
    return linear


"""QuantLinear: a weight-only int8 / int4 linear layer stored as plain integer tensors and scales.

Bundled into every saved model directory (depends on torch only). The integer weight and its
scales are buffers, so the state dict (and the safetensors file) holds ``qweight``, ``scale`` (and
``zero`` for int4) next to an optional float ``bias``: no pickle, no tensor subclass.

* int8: symmetric, one scale per output row per group: ``w = q * scale``, q in [-127, 127].
* int4: asymmetric per group of ``group_size`` input columns: ``w = q * scale + zero``, q in
  [0, 15], two values packed per byte (low nibble = even column).

The forward pass dequantizes the weight with torch ops and calls ``F.linear`` (no custom kernel):
the layer is a storage format (bytes of weights), not a speed-up, on CPUs without int kernels.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BITS = (8, 4)
SCALE_DTYPE = torch.float16


def pick_group(in_features: int, group_size: int | None) -> int:
    """``group_size`` if it divides ``in_features`` (halved down to 8 until one does), else the row."""
    if group_size is None or group_size >= in_features:
        return in_features
    g = group_size
    while g >= 8:
        if in_features % g == 0:
            return g
        g //= 2
    return in_features


class QuantLinear(nn.Module):
    """``nn.Linear`` replacement holding a quantized weight (``bits`` = 8 or 4)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool = False,
        dtype: torch.dtype | None = None,
        device=None,
    ) -> None:
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be one of {BITS}, got {bits}")
        if in_features % group_size or (bits == 4 and group_size % 2):
            raise ValueError(f"group_size {group_size} does not fit {in_features} input features")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.float_dtype = dtype or torch.float32  # of ``weight`` when read directly
        groups = in_features // group_size
        if bits == 8:
            q = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
        else:
            q = torch.zeros(out_features, in_features // 2, dtype=torch.uint8, device=device)
        self.register_buffer("qweight", q)
        self.register_buffer(
            "scale", torch.ones(out_features, groups, dtype=SCALE_DTYPE, device=device)
        )
        if bits == 4:
            self.register_buffer(
                "zero", torch.zeros(out_features, groups, dtype=SCALE_DTYPE, device=device)
            )
        else:
            self.zero = None
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls, weight: torch.Tensor, bias: torch.Tensor | None, bits: int, group_size: int
    ):
        """Quantize ``weight`` (out x in) round-to-nearest; ``bias`` stays in its float dtype."""
        out_f, in_f = weight.shape
        mod = cls(in_f, out_f, bits, group_size, bias is not None, weight.dtype, weight.device)
        w = weight.detach().to(torch.float32).reshape(out_f, in_f // group_size, group_size)
        with torch.no_grad():
            if bits == 8:
                scale = (w.abs().amax(-1) / 127).clamp_min(1e-12).to(SCALE_DTYPE)
                s = scale.to(torch.float32)[..., None]
                mod.qweight.copy_(torch.round(w / s).clamp(-127, 127).reshape(out_f, in_f))
            else:
                lo, hi = w.amin(-1), w.amax(-1)
                scale = ((hi - lo) / 15).clamp_min(1e-12).to(SCALE_DTYPE)
                zero = lo.to(SCALE_DTYPE)
                s, z = scale.to(torch.float32)[..., None], zero.to(torch.float32)[..., None]
                q = torch.round((w - z) / s).clamp(0, 15).to(torch.uint8).reshape(out_f, in_f)
                mod.qweight.copy_(q[:, 0::2] | (q[:, 1::2] << 4))
                mod.zero.copy_(zero)
            mod.scale.copy_(scale)
            if bias is not None:
                mod.bias.copy_(bias.detach())
        return mod

    def int_weight(self) -> torch.Tensor:
        """The integer values (out x in), unpacked."""
        if self.bits == 8:
            return self.qweight
        lo, hi = self.qweight & 15, self.qweight >> 4
        return torch.stack([lo, hi], -1).reshape(self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        g = self.in_features // self.group_size
        q = self.int_weight().to(dtype).reshape(self.out_features, g, self.group_size)
        w = q * self.scale.to(dtype)[..., None]
        if self.zero is not None:
            w = w + self.zero.to(dtype)[..., None]
        return w.reshape(self.out_features, self.in_features)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (for code that reads ``.weight``, e.g. densifying)."""
        return self.dequantize(self.bias.dtype if self.bias is not None else self.float_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
        )

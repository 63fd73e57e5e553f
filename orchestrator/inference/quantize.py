"""Weight-only int8 for serving (inference.quantize=int8): every linear layer of the blocks and
the output keeps its weight as int8 with one fp32 scale per output row (symmetric, absmax / 127)
and dequantizes it in its forward pass. Weights take a quarter of their fp32 memory; activations
and the KV cache stay in the model's precision. The embedding is left as it is."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(linear.weight.dtype))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.qweight.to(x.dtype) * self.scale[:, None].to(x.dtype))


def quantize_int8(model: nn.Module) -> nn.Module:
    """Replaces the model's nn.Linear modules (not the embedding) in place."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child))
    return model


def weight_bytes(model: nn.Module) -> int:
    tensors = list(model.parameters()) + [b for n, b in model.named_buffers() if not n.startswith("rope_")]
    return sum(t.numel() * t.element_size() for t in tensors)

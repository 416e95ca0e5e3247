"""Weight-only int8 (RIVULET_QUANT=int8): each projection's rows and the LM head's stored as int8 with one
fp32 scale per output row.

A one-stream decode step on a CPU reads every weight once and waits on memory for it (bench/README.md
section 16): int8 weights are a quarter of fp32's bytes. ``quantize_model`` makes the int8 rows and
overwrites the fp32 weights with what they stand for (each int8 times its scale). Where the native step
(models/native_step.py) serves, every product then reads the int8 rows, its own and those of prefill
and torch's steps (``native_step.keep_only_int8``), and the fp32 weights are released. Elsewhere (a GPU,
native kernels off) torch multiplies the overwritten weights: the outputs are the int8 model's, the
speed and memory are not. Either way every path computes with the same weights, so a stream's tokens do
not depend on which kernel served its step.

Symmetric per-row scales (``max |w| / 127``), as weight-only int8 in torchao and TensorRT-LLM: no zero
point, so a product is ``scale * sum(q * x)``. The token embedding keeps fp32 (a step reads one row of it),
unless the LM head is tied to it: then both are the quantized matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.llama import Llama

QUANT_MODES = ("none", "int8")
INT8_MAX = 127  # symmetric: -127..127, so negating a weight never overflows


@dataclass(frozen=True)
class Int8Rows:
    """A weight [out, in] as ``values`` int8 [out, in] (contiguous) times ``scales`` fp32 [out]."""

    values: torch.Tensor
    scales: torch.Tensor

    def dequantized(self) -> torch.Tensor:
        """The fp32 weight these rows stand for: each int8 times its row's scale, rounded once."""
        return self.values.to(torch.float32) * self.scales.unsqueeze(1)


def quantize_rows(weight: torch.Tensor) -> Int8Rows:
    """``weight`` [out, in] -> int8 rows with one scale each, rounding to the nearest step. A row of zeros
    gets scale 0 (its int8 are 0)."""
    if weight.dim() != 2:
        raise ValueError(f"int8 quantization takes a matrix, not a tensor of shape {tuple(weight.shape)}")
    weight = weight.detach().to(torch.float32)
    scales = weight.abs().amax(dim=1) / INT8_MAX
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))
    values = torch.round(weight / safe.unsqueeze(1)).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)
    return Int8Rows(values.contiguous(), scales.contiguous())


def int8_bytes(model: nn.Module) -> int:
    """Bytes ``quantize_model`` adds to ``model``: an int8 per projection weight (the LM head's included) and
    an fp32 scale per row, counted before it runs so that the KV cache is sized around them."""
    return sum(m.weight.numel() + 4 * m.weight.shape[0] for m in model.modules() if isinstance(m, nn.Linear))


@torch.no_grad()
def _quantize_in_place(weight: torch.Tensor) -> Int8Rows:
    """Quantize ``weight`` and overwrite it with what the int8 rows stand for (so views of it, fused ones
    included, see the same values)."""
    rows = quantize_rows(weight)
    weight.copy_(rows.dequantized().to(weight.dtype))
    return rows


@torch.no_grad()
def quantize_model(model: Llama) -> int:
    """Every projection of ``model`` (fused: ``Llama.fuse_projections`` first) and its LM head as int8 rows,
    kept beside the weights (``int8`` attributes, read by the native step), the weights overwritten with
    their dequantized values. -> bytes of int8 rows made"""
    made = 0
    for layer in model.model.layers:
        attention, mlp = layer.self_attn, layer.mlp
        if attention.qkv_weight is None or mlp.gate_up_weight is None:
            raise ValueError("quantize_model needs the fused projections (Llama.fuse_projections)")
        attention.qkv_int8 = _quantize_in_place(attention.qkv_weight)
        attention.o_proj.int8 = _quantize_in_place(attention.o_proj.weight)
        mlp.gate_up_int8 = _quantize_in_place(mlp.gate_up_weight)
        mlp.down_proj.int8 = _quantize_in_place(mlp.down_proj.weight)
        made += sum(rows.values.numel() for rows in (attention.qkv_int8, attention.o_proj.int8,
                                                      mlp.gate_up_int8, mlp.down_proj.int8))
    model.lm_head.int8 = _quantize_in_place(model.lm_head.weight)
    return made + model.lm_head.int8.values.numel()

"""Decode attention over each row's own keys, on a CPU (RIVULET_NATIVE_KERNELS).

A batched decode step attends each row's new query over that row's cached keys, and rows differ in
length: streams start at different times. Through ``F.scaled_dot_product_attention`` every row attends over
the longest row's keys with a mask, so the step reads B x longest keys and values; torch's CPU kernel
also streams them at a fraction of the memory's speed for one query a row. At 64 streams of 20-150 keys
(bench-512, a 2-core VM) that took 5-6 ms a layer, as long as the layer's projections. The kernel here
(``ragged_decode_attention`` in native_kernels.c) reads each row's own keys and values once, 2.5-3.3x
faster there, and faster at every batch size tried (bench/README.md section 15).

It is C, built at start-up or ahead of time (models/native_build.py). Without a library, or for a dtype
or shape it does not take, decode steps attend through SDPA as before: never a reason not to serve. Inside a compiled step it is an opaque custom op (``rivulet::ragged_decode_attention``).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from models import native_build

MAX_GROUP = 16  # query heads per key/value head, as native_kernels.c's MAX_GROUP
MAX_DIM = 256  # head dimension, as its MAX_DIM

_c_int64 = ctypes.c_int64
_ARGTYPES = ([ctypes.c_void_p] * 5 + [_c_int64] * 5 + [_c_int64] * 6 + [ctypes.c_float, ctypes.c_int])


class RaggedAttention:
    """The loaded kernel."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self.library = Path(library._name)
        self._function = library.ragged_decode_attention
        self._function.restype = ctypes.c_int
        self._function.argtypes = _ARGTYPES

    @staticmethod
    def takes(heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device) -> bool:
        """Whether the kernel serves a model of this shape, dtype and device."""
        return (device.type == "cpu" and dtype == torch.float32 and kv_heads > 0 and heads % kv_heads == 0
                and heads // kv_heads <= MAX_GROUP and 0 < head_dim <= MAX_DIM)

    def __call__(self, query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                 lengths: torch.Tensor) -> torch.Tensor:
        """query [B, H, 1, D]; keys, values: a whole layer's cache [rows, KV, positions, D]; lengths [B]
        (int64): row b attends over its first ``lengths[b]`` keys (clamped to the cache's positions).
        -> [B, H, 1, D]"""
        batch, heads, queries, dim = query.shape
        query = query.contiguous()
        lengths = lengths.contiguous()
        # The C side trusts these: a wrong dtype, device or shape would read or write out of bounds.
        tensors = (query, keys, values)
        if (any(t.dtype != torch.float32 or t.device.type != "cpu" for t in tensors)
                or lengths.dtype != torch.int64 or lengths.device.type != "cpu" or lengths.shape != (batch,)
                or queries != 1 or keys.dim() != 4 or keys.shape != values.shape or keys.shape[0] < batch
                or keys.shape[3] != dim or keys.stride(-1) != 1 or values.stride(-1) != 1):
            raise ValueError(f"ragged_decode_attention: unexpected tensors {tuple(query.shape)} {query.dtype} "
                             f"{tuple(keys.shape)}/{keys.stride()} {keys.dtype} {lengths.dtype}")
        out = torch.empty_like(query)
        status = self._function(
            query.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), lengths.data_ptr(),
            batch, heads, keys.shape[1], dim, keys.shape[2], *keys.stride()[:3], *values.stride()[:3],
            dim ** -0.5, torch.get_num_threads())
        if status != 0:
            raise ValueError(f"ragged_decode_attention: {heads} heads over {keys.shape[1]} of dim {dim}")
        return out


_loaded: RaggedAttention | None = None


def load() -> RaggedAttention | None:
    """The kernel (built on first use, once per process); None where it cannot be built (logged once)."""
    global _loaded
    if _loaded is None:
        library = native_build.load()
        if library is not None:
            _loaded = RaggedAttention(library)
    return _loaded


@torch.library.custom_op("rivulet::ragged_decode_attention", mutates_args=())
def ragged_decode_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                            lengths: torch.Tensor) -> torch.Tensor:
    """The loaded kernel as an operator a compiled step calls without tracing into it."""
    assert _loaded is not None, "the native decode attention is not loaded"
    return _loaded(query, keys, values, lengths)


@ragged_decode_attention.register_fake
def _(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(query, memory_format=torch.contiguous_format)


def attend(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Through the loaded kernel: directly when eager, as the custom op inside a compiled step."""
    if torch.compiler.is_compiling():
        return ragged_decode_attention(query, keys, values, lengths)
    assert _loaded is not None, "the native decode attention is not loaded"
    return _loaded(query, keys, values, lengths)

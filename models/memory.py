"""How many sequences' KV cache fits? Asked once at load, instead of an out-of-memory crash (or, on
Linux, the OOM killer) later.

The cache is preallocated for ``max_batch`` rows of ``max_seq`` positions in every layer: for a 7B
Llama 2 (32 layers, 32 KV heads of 128) in bf16 that is 0.5 MiB a position, so 32 rows of 4,096
positions want 64 GiB on top of the weights. When they do not fit, fewer rows are allocated and fewer
sequences run at once (the rest wait); when not even one fits, loading fails naming RIVULET_MAX_CONTEXT.
"""
from __future__ import annotations

import ctypes
from collections.abc import Iterable
from pathlib import Path

import torch

from models.config import LlamaConfig
from models.errors import CapacityError

GiB = 1024 ** 3
# Share of the free memory the cache may take: the rest is for activations (a prefill of
# PREFILL_TOKEN_BUDGET tokens, the logits of a full batch) and for the allocator's slack.
CACHE_SHARE = 0.9
MEMINFO = Path("/proc/meminfo")
MAPS = Path("/proc/self/maps")


def kv_cache_bytes(config: LlamaConfig, max_batch: int, max_seq: int, dtype: torch.dtype) -> int:
    """Keys and values of every layer for ``max_batch`` rows of ``max_seq`` positions."""
    per_position = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim
    return per_position * max_batch * max_seq * dtype.itemsize


def free_bytes(device: torch.device) -> int | None:
    """Memory still free on ``device`` (after the weights are loaded), or None when it cannot be told."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "cpu":
        try:
            for line in MEMINFO.read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel counts in KiB
        except (OSError, ValueError, IndexError):
            return None
    return None


def fitting_batch(config: LlamaConfig, max_batch: int, max_seq: int, dtype: torch.dtype,
                  device: torch.device, free: int | None, spare_positions: int = 0) -> int:
    """How many sequences of ``max_seq`` tokens the cache can hold in CACHE_SHARE of ``free`` bytes:
    ``max_batch`` when all fit (or the free memory is unknown), fewer when not, as vLLM serves fewer
    sequences at once when its cache is short. Raises CapacityError when not even one fits.

    ``spare_positions``: positions each row holds past ``max_seq``, which no sequence uses (the CUDA
    graphs' padding rows write there: models/cuda_graphs.py)."""
    if free is None:
        return max_batch
    budget = int(free * CACHE_SHARE)
    per_row = kv_cache_bytes(config, 1, max_seq + spare_positions, dtype)
    fitting = min(max_batch, budget // per_row)
    if fitting >= 1:
        return fitting
    fitting_context = budget // kv_cache_bytes(config, 1, 1, dtype) - spare_positions
    advice = (f"set RIVULET_MAX_CONTEXT={fitting_context} or less" if fitting_context >= 2
              else "the weights leave no room: use a larger device or a smaller model")
    raise CapacityError(
        f"the KV cache for one sequence of {max_seq} tokens (RIVULET_MAX_CONTEXT, else config.json "
        f"max_position_embeddings) needs {per_row / GiB:.2f} GiB ({config.num_hidden_layers} layers x "
        f"{config.num_key_value_heads} KV heads x {config.head_dim}, {str(dtype).removeprefix('torch.')}), "
        f"but {free / GiB:.2f} GiB is free on {device} after loading the weights and the cache may take "
        f"{CACHE_SHARE:.0%} of it; {advice}"
    )


def file_backed_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``' distinct CPU storages that lie in a file's mapping: weights loaded from a
    safetensors file are pages of its mapping, which /proc/meminfo counts as available (page cache) while
    they serve. The CPU layout copies them into the process's own memory (fused projections, 2 MiB pages:
    models/huge_pages.py), so the KV cache must not count on them. 0 where /proc/self/maps cannot be read."""
    try:
        mapped = [_address_range(line) for line in MAPS.read_text().splitlines() if _names_a_file(line)]
    except OSError:
        return 0
    storages = {}
    for tensor in tensors:
        if tensor.device.type == "cpu" and tensor.layout == torch.strided and not tensor.is_mkldnn:
            storage = tensor.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(size for address, size in storages.items()
               if any(start <= address < end for start, end in mapped))


def _names_a_file(maps_line: str) -> bool:
    fields = maps_line.split(maxsplit=5)
    return len(fields) == 6 and fields[5].startswith("/")


def _address_range(maps_line: str) -> tuple[int, int]:
    start, end = maps_line.split(maxsplit=1)[0].split("-")
    return int(start, 16), int(end, 16)


def return_freed_memory() -> None:
    """Hand the memory freed at load (quantizing's temporaries, released or moved weights) back to the
    system. glibc keeps freed blocks below its mmap threshold (up to 32 MB) in the process for reuse, so a
    model of small matrices would otherwise keep their old size in RSS. Elsewhere a no-op."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass

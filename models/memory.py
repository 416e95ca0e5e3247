"""Will the KV cache fit? Checked once at load, so a too-large batch or context fails with a message
that says what to change, instead of an out-of-memory crash (or, on Linux, the OOM killer) later.

The cache is preallocated for ``max_batch`` rows of ``max_seq`` positions in every layer: for a 7B
Llama 2 (32 layers, 32 KV heads of 128) in bf16 that is 0.5 MiB a position, so 32 rows of 4,096
positions want 64 GiB on top of the weights. RIVULET_MAX_BATCH and RIVULET_MAX_CONTEXT are the knobs.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from models.config import LlamaConfig
from models.errors import CapacityError

GiB = 1024 ** 3
# Share of the free memory the cache may take: the rest is for activations (a prefill of
# PREFILL_TOKEN_BUDGET tokens, the logits of a full batch) and for the allocator's slack.
CACHE_SHARE = 0.9
MEMINFO = Path("/proc/meminfo")


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


@dataclass(frozen=True)
class CachePlan:
    config: LlamaConfig
    max_batch: int
    max_seq: int
    dtype: torch.dtype

    @property
    def bytes(self) -> int:
        return kv_cache_bytes(self.config, self.max_batch, self.max_seq, self.dtype)

    def check(self, device: torch.device, free: int | None) -> None:
        """Raise CapacityError when the cache would take more than CACHE_SHARE of ``free`` bytes."""
        if free is None:
            return
        budget = int(free * CACHE_SHARE)
        if self.bytes <= budget:
            return
        per_row = kv_cache_bytes(self.config, 1, self.max_seq, self.dtype)
        per_position = kv_cache_bytes(self.config, self.max_batch, 1, self.dtype)
        fitting_batch = budget // per_row
        fitting_context = budget // per_position
        advice = []
        if fitting_batch >= 1:
            advice.append(f"RIVULET_MAX_BATCH={fitting_batch}")
        if fitting_context >= 2:
            advice.append(f"RIVULET_MAX_CONTEXT={fitting_context}")
        raise CapacityError(
            f"the KV cache for {self.max_batch} sequences (RIVULET_MAX_BATCH) of {self.max_seq} tokens "
            f"(RIVULET_MAX_CONTEXT, else config.json max_position_embeddings) needs {self.bytes / GiB:.1f} GiB "
            f"({self.config.num_hidden_layers} layers x {self.config.num_key_value_heads} KV heads x "
            f"{self.config.head_dim}, {str(self.dtype).removeprefix('torch.')}), but {free / GiB:.1f} GiB is "
            f"free on {device} after loading the weights and the cache may take {CACHE_SHARE:.0%} of it; "
            + ("set " + " or ".join(advice) + " (or lower both)" if advice
               else "the weights leave no room: use a larger device or a smaller model")
        )

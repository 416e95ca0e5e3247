"""A CPU model's weights held in 2 MiB pages (Linux transparent huge pages).

A decode step of one or a few rows reads every weight once and is bound by the memory. In 4 KiB pages it
walks through one page per 4 KiB of weights (35,000 for a 136 MB model) and misses the TLB at each; in a
virtual machine every miss is a two-level page walk.

Linux gives 2 MiB pages to anonymous memory advised ``MADV_HUGEPAGE`` where transparent huge pages are
``always`` or ``madvise`` (/sys/kernel/mm/transparent_hugepage/enabled; ``madvise`` is the default of most
distributions). Torch's allocator advises only its own allocations of 2 MiB and more, and only with
``THP_MEM_ALLOC_ENABLE=1`` (gunicorn.conf.py sets it): the fused projections made at load, the KV cache.
The matrices still read from the checkpoint file's mapping (a layer's output projections, the LM head) and
those under 2 MiB stay in 4 KiB pages. So ``hold_in_huge_pages`` copies the model's large tensors into one
private anonymous mapping advised so, and points each tensor at its copy in place (``Tensor.set_``): every
holder of a tensor follows it, views of one storage stay views of one copy, and the old memory is freed.
In fp32 the native step of 1 to 8 rows measured 2-11% faster (bench/README.md section 18). Two stay where they are: the
KV cache, sized to the free memory (copying it would need that much again), and the token embeddings, of
which a step reads one row a token (unless the LM head is tied to them: then the head's walk moves them).

Weights read from a safetensors file are pages of its mapping until then, in the page cache; their copies
are the process's own memory (the backend counts them before sizing the KV cache: models/memory.py).
"""
from __future__ import annotations

import dataclasses
import logging
import mmap
import sys
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from models.llama import KVCache

log = logging.getLogger("rivulet.engine")

HUGE_PAGE = 2 << 20
# Tensors below this stay where they are: a norm's weight is a few KiB, read from the caches anyway.
SMALLEST = 256 << 10
# Each storage starts on a page of its own, and so on a cache line.
ALIGNMENT = 4096
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def available() -> bool:
    """Whether advised memory gets 2 MiB pages here: Linux, transparent huge pages not ``never``."""
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        selected = THP_MODE.read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return False
    return selected in ("always", "madvise")


def hold_in_huge_pages(model: nn.Module, smallest: int = SMALLEST) -> int:
    """Every CPU storage of ``model``'s tensors (parameters, buffers, tensor attributes and the tensors of
    dataclass attributes, such as int8 rows) of at least ``smallest`` bytes, as the module docstring says,
    copied into memory advised for 2 MiB pages. Call it before anything takes the tensors' addresses (the
    native step binds them). -> bytes held (each storage rounded up to 4 KiB); 0 where 2 MiB pages are not
    available or the mapping is refused (logged: the weights then stay where they are)."""
    if not available():
        return 0
    groups: dict[int, list[torch.Tensor]] = {}
    for tensor in _tensors(model):
        storage = tensor.untyped_storage()
        if storage.nbytes() >= smallest:
            groups.setdefault(storage.data_ptr(), []).append(tensor)
    if not groups:
        return 0
    sizes = {key: _aligned(tensors[0].untyped_storage().nbytes()) for key, tensors in groups.items()}
    try:  # a private mapping: a shared one is shmem, which THP's ``enabled`` mode does not cover
        region = mmap.mmap(-1, sum(sizes.values()) + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        region.madvise(mmap.MADV_HUGEPAGE)
    except OSError as exc:  # the weights serve as well where they are, a little slower
        log.warning("the weights stay in the pages they were loaded in: no memory advised for 2 MiB pages (%s)",
                    exc)
        return 0
    base = torch.frombuffer(region, dtype=torch.uint8)  # keeps ``region`` alive as long as any copy
    offset = -base.data_ptr() % HUGE_PAGE
    with torch.inference_mode():  # set_ on parameters and on inference tensors alike
        for key, tensors in groups.items():
            old = tensors[0].untyped_storage()
            copy = base[offset:offset + old.nbytes()]
            copy.copy_(torch.empty(0, dtype=torch.uint8).set_(old, 0, (old.nbytes(),), (1,)))
            for tensor in tensors:
                tensor.set_(base.untyped_storage(), offset // tensor.element_size() + tensor.storage_offset(),
                            tensor.size(), tensor.stride())
            offset += sizes[key]
    return sum(sizes.values())


def _aligned(size: int) -> int:
    return -(-size // ALIGNMENT) * ALIGNMENT


def _tensors(model: nn.Module) -> Iterator[torch.Tensor]:
    """Each dense CPU tensor object ``model`` holds, once, outside its KV caches and token embeddings."""
    seen: set[int] = set()
    for module in model.modules():
        if isinstance(module, (KVCache, nn.Embedding)):
            continue
        values = [*module._parameters.values(), *module._buffers.values(), *vars(module).values()]
        for value in values:  # grows by the fields of dataclasses met on the way
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                values.extend(getattr(value, field.name) for field in dataclasses.fields(value))
            elif (isinstance(value, torch.Tensor) and id(value) not in seen and value.device.type == "cpu"
                  and value.layout == torch.strided and not value.is_mkldnn):
                seen.add(id(value))
                yield value

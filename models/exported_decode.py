"""The batch-1 decode step compiled ahead of time by AOTInductor (RIVULET_COMPILE on a CPU, where the
native one-row step of models/native_step.py does not serve: RIVULET_NATIVE_KERNELS off, or no kernels).

At one stream a step through ``torch.compile`` (models/compiled_decode.py) spends about half a
millisecond outside its kernels: Dynamo's cache lookup and pre-graph bytecode, then inductor's Python
wrapper between kernels. AOTInductor compiles the same graph into a shared library whose wrapper is
C++: a step is one call with a list of tensors, no guards, no Python between kernels, and the GIL is
free for the hub while it runs. One stream is how most people first try a server, and the step where
that overhead is the largest share.

Nothing is copied:
- the weights are the model's own tensors, handed to the library by name (``load_constants`` with
  ``user_managed``; the library is built without them);
- the KV cache is not the model's buffers (an exported program keeps buffers it writes as its own
  state) but arguments, each layer's keys and values, written in place at the step's position.

Shapes: batch 1 and one dynamic dimension, the number of keys (2 to the cache's positions - 1; a step at
the very last position, or with a thread count the kernels were not compiled for, goes through
torch.compile). Compiling takes tens of seconds at start-up, after torch.compile's warm-up. Anything
that fails is logged once and the torch.compile step serves instead: like compiling, this is an
optimisation, never a reason not to serve.
"""
from __future__ import annotations

import functools
import logging
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from models import cpu_weights
from models.llama import Llama
from models.subprocesses import real_subprocess

log = logging.getLogger("rivulet.engine")

# The fewest keys a step can attend over: a one-token prompt's first step. Export needs a range for the
# dynamic dimension, and sizes 0 and 1 would be specialised.
MIN_KEYS = 2


class Batch1Step(nn.Module):
    """``Llama.decode`` for cache row 0 alone, with the caches as arguments. -> logits [1, V]

    ``key_positions`` is ``0..keys-1`` (a view of the rotary table's positions): its length is the number
    of keys attended, the graph's one dynamic size. ``caches`` are each layer's keys then values, the
    model's own cache tensors [max_batch, KV, S, D]; the step writes row 0 at ``positions[0]``."""

    def __init__(self, model: Llama) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, key_positions: torch.Tensor,
                caches: list[torch.Tensor]) -> torch.Tensor:
        model = self.model
        keys = key_positions.shape[0]
        x = model.model.embed_tokens(tokens.unsqueeze(1))  # [1, 1, hidden]
        cos, sin = model.rotary(positions.unsqueeze(1), x.dtype)
        _, kv_heads, max_seq, head_dim = caches[0].shape
        # Row 0's slot of each head at the step's position in a cache seen as [B*KV*S, D]. A write through
        # that flat view of the whole tensor is done in place; one through a view of row 0 compiled into a
        # copy of the row out and back, every step (2 MB a layer at 1,024 positions).
        slots = torch.arange(kv_heads, device=positions.device) * max_seq + positions  # [KV]
        for index, layer in enumerate(model.model.layers):
            attention = layer.self_attn
            q, k, v = attention.project(layer.input_layernorm(x), cos, sin)  # [1, H|KV, 1, D]
            key_cache, value_cache = caches[2 * index], caches[2 * index + 1]
            key_cache.view(-1, head_dim).index_copy_(0, slots, k.reshape(-1, head_dim))
            value_cache.view(-1, head_dim).index_copy_(0, slots, v.reshape(-1, head_dim))
            out = F.scaled_dot_product_attention(q, key_cache[:1, :, :keys], value_cache[:1, :, :keys],
                                                 enable_gqa=attention.n_kv_heads != attention.n_heads)
            out = out.transpose(1, 2).reshape(1, 1, attention.n_heads * attention.head_dim)
            x = x + attention.o_proj(out)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return model.lm_head(model.model.norm(x)[:, 0])


class ExportedDecode:
    """The batch-1 step through an AOTInductor library, built by ``build`` on the engine thread."""

    def __init__(self, model: Llama, threads: int) -> None:
        """``threads``: the torch threads to compile the kernels for (they keep that count)."""
        self.model = model
        self.threads = threads
        self.error: str | None = None
        self.steps = 0
        self._library = None  # the loaded library's runner (torch._C._aoti.AOTIModelPackageLoader)
        self._caches: list[torch.Tensor] = []
        self._max_keys = 0

    def build(self) -> None:
        started = time.perf_counter()
        try:
            self._build()
        except Exception as exc:  # an op AOTInductor cannot compile, no compiler: torch.compile serves
            self.error = f"{type(exc).__name__}: {exc}"
            self._library = None
            log.warning("RIVULET_COMPILE: the batch-1 step was not compiled ahead of time, torch.compile "
                        "serves it: %s", self.error)
            return
        log.info("RIVULET_COMPILE: batch-1 step compiled ahead of time in %.1f s for %d threads",
                 time.perf_counter() - started, self.threads)

    def _build(self) -> None:
        model = self.model
        weight = model.lm_head.weight
        if weight.device.type != "cpu":
            raise RuntimeError("a CPU step only (CUDA graphs serve a GPU)")
        layers = model.model.layers
        if layers[0].mlp.gate_up_packed is not None and cpu_weights.uses_packed(1, weight.dtype):
            # The packed matmul is a Python custom op, which a library without Python cannot call.
            raise RuntimeError(f"one {weight.dtype} row goes through the packed weights")
        caches = [tensor for layer in layers for tensor in (layer.self_attn.cache.k, layer.self_attn.cache.v)]
        max_keys = caches[0].shape[2] - 1  # a slice as long as the whole cache would be a shape of its own
        if max_keys < MIN_KEYS:
            raise RuntimeError("the cache is too short")
        import torch._inductor
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1  # in this process: see models/compiled_decode.py
        step = Batch1Step(model)
        # The real caches as the example: export traces with stand-ins of their shapes and writes nothing.
        token, position = (torch.ones(1, dtype=torch.long, device=weight.device) for _ in range(2))  # not aliased
        example = (token, position, model.rotary.positions[:MIN_KEYS], caches)
        keys = torch.export.Dim("keys", min=MIN_KEYS, max=max_keys)
        threads_before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        detached = [layer.self_attn.cache for layer in layers]
        try:
            for layer in layers:  # the caches are arguments, not state of the exported program
                layer.self_attn.cache = None
            # In inference mode, as the engine loads the model: export cannot trace its inference tensors
            # outside it. Torch's own deprecation warnings on the way are no news for a server's log.
            with torch.inference_mode(), real_subprocess(), warnings.catch_warnings(), \
                    tempfile.TemporaryDirectory() as work:
                warnings.simplefilter("ignore")
                exported = torch.export.export(step, example, strict=False,
                                               dynamic_shapes=(None, None, {0: keys}, [None] * len(caches)))
                package = torch._inductor.aoti_compile_and_package(
                    exported, package_path=str(Path(work) / "batch1.pt2"),
                    inductor_configs={"aot_inductor.package_constants_in_so": False})
                library = torch._inductor.aoti_load_package(package).loader
        finally:
            for layer, cache in zip(layers, detached):
                layer.self_attn.cache = cache
            torch.set_num_threads(threads_before)
        # The weights by the names the export gave them (paths from ``step``): the model's own tensors.
        constants = {name: functools.reduce(getattr, name.split("."), step) for name in library.get_constant_fqns()}
        library.load_constants(constants, False, True, True)  # (use inactive, check full update, user managed)
        self._library, self._caches, self._max_keys = library, caches, max_keys

    def serves(self, threads: int, keys: int) -> bool:
        """Whether a batch-1 step over ``keys`` keys with ``threads`` torch threads runs through the library."""
        return self._library is not None and threads == self.threads and MIN_KEYS <= keys <= self._max_keys

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, keys: int) -> torch.Tensor:
        """``tokens`` [1] at ``positions`` [1], attending over ``keys`` keys. -> logits [1, V]"""
        self.steps += 1
        return self._library.run([tokens, positions, self.model.rotary.positions[:keys], *self._caches])[0]

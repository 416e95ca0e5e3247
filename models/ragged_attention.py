"""Decode attention over each row's own keys, on a CPU (RIVULET_NATIVE_ATTENTION).

A batched decode step attends each row's new query over that row's cached keys, and rows differ in
length: streams start at different times. Through ``F.scaled_dot_product_attention`` every row attends over
the longest row's keys with a mask, so the step reads B x longest keys and values; torch's CPU kernel
also streams them at a fraction of the memory's speed for one query a row. At 64 streams of 20-150 keys
(bench-512, a 2-core VM) that took 5-6 ms a layer, as long as the layer's projections. The kernel here
(``ragged_attention.c``) reads each row's own keys and values once, 2.5-3.3x faster there, and as fast or
faster at every batch size tried (bench/README.md section 15).

It is C, built at start-up by the machine's compiler (under a second, cached per source and CPU) and
loaded with ctypes, which frees the GIL while it runs. Without a compiler (the Docker image has none), or
for a dtype or shape it does not take, decode steps attend through SDPA as before: never a reason not to
serve. Inside a compiled step it is an opaque custom op (``rivulet::ragged_decode_attention``).
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

log = logging.getLogger("rivulet.engine")

SOURCE = Path(__file__).with_suffix(".c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")
MAX_GROUP = 16  # query heads per key/value head, as the C source's MAX_GROUP
MAX_DIM = 256  # head dimension, as its MAX_DIM

_c_int64 = ctypes.c_int64
_ARGTYPES = ([ctypes.c_void_p] * 5 + [_c_int64] * 5 + [_c_int64] * 6 + [ctypes.c_float, ctypes.c_int])


class RaggedAttention:
    """The loaded kernel."""

    def __init__(self, library: Path) -> None:
        self.library = library
        self._function = ctypes.CDLL(str(library)).ragged_decode_attention
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
        batch, heads, _, dim = query.shape
        query = query.contiguous()
        lengths = lengths.contiguous()
        if (keys.stride(-1) != 1 or values.stride(-1) != 1 or keys.shape[0] < batch or lengths.dtype != torch.int64
                or lengths.shape[0] != batch or keys.shape != values.shape or keys.dtype != query.dtype):
            raise ValueError(f"ragged_decode_attention: unexpected tensors {tuple(query.shape)} "
                             f"{tuple(keys.shape)}/{keys.stride()} {lengths.dtype}")
        out = torch.empty_like(query)
        status = self._function(
            query.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), lengths.data_ptr(),
            batch, heads, keys.shape[1], dim, keys.shape[2], *keys.stride()[:3], *values.stride()[:3],
            dim ** -0.5, torch.get_num_threads())
        if status != 0:
            raise ValueError(f"ragged_decode_attention: {heads} heads over {keys.shape[1]} of dim {dim}")
        return out


_loaded: RaggedAttention | None = None
_load_error: str | None = None


def load(cache_dir: Path | None = None) -> RaggedAttention | None:
    """The kernel, built on first use (once per process); None where it cannot be built (logged once)."""
    global _loaded, _load_error
    if _loaded is not None or _load_error is not None:
        return _loaded
    try:
        _loaded = RaggedAttention(build(cache_dir))
        log.info("native decode attention: %s", _loaded.library)
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        _load_error = f"{type(exc).__name__}: {exc}"
        log.warning("native decode attention unavailable, decode steps attend through SDPA: %s", _load_error)
    return _loaded


def build(cache_dir: Path | None = None) -> Path:
    """Compile the kernel unless this source for this CPU already is. -> the shared library's path.
    Raises RuntimeError without a compiler, SubprocessError when compiling fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc, gcc or $CC)")
    source = SOURCE.read_bytes()
    # -march=native: the library is for this CPU only, so the CPU is part of its name.
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS, platform.machine(), _cpu_flags())).encode())
    directory = cache_dir or Path(tempfile.gettempdir()) / f"rivulet-kernels-{os.getuid()}"
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"ragged_attention-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    partial = directory / f"{library.name}.{os.getpid()}.tmp"
    from models.compiled_decode import real_subprocess  # gevent's subprocess fails off the loop's thread

    with real_subprocess():
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(partial), "-lm"],
                              capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise subprocess.SubprocessError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
    os.replace(partial, library)  # atomic: workers building at once each see a whole library
    return library


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


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

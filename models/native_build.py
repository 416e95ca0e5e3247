"""Builds and loads models/native_kernels.c: CPU kernels for the decode step, in C.

The library is built at start-up by the machine's C compiler (under a second) with ``-march=native``, so
it is cached per source and CPU, in the temp directory, and shared by the workers of one machine. It is
loaded with ctypes, which frees the GIL while a kernel runs. Without a compiler (the Docker image has
none) ``load`` returns None once, logged, and the callers serve through torch as before: a missing
kernel is never a reason not to serve.
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

log = logging.getLogger("rivulet.engine")

SOURCE = Path(__file__).with_name("native_kernels.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")

_library: ctypes.CDLL | None = None
load_error: str | None = None


def load(cache_dir: Path | None = None) -> ctypes.CDLL | None:
    """The kernels' library, built on first use (once per process); None where it cannot be built."""
    global _library, load_error
    if _library is not None or load_error is not None:
        return _library
    try:
        path = build(cache_dir)
        _library = ctypes.CDLL(str(path))
        log.info("native CPU kernels: %s", path)
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        load_error = f"{type(exc).__name__}: {exc}"
        log.warning("native CPU kernels unavailable (decode steps run through torch): %s", load_error)
    return _library


def build(cache_dir: Path | None = None) -> Path:
    """Compile the kernels unless this source for this CPU already is. -> the shared library's path.
    Raises RuntimeError without a compiler, SubprocessError when compiling fails."""
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc, gcc or $CC)")
    source = SOURCE.read_bytes()
    # -march=native: the library is for this CPU only, so the CPU is part of its name.
    key = hashlib.sha256(source + " ".join((compiler, *FLAGS, platform.machine(), _cpu_flags())).encode())
    directory = cache_dir or Path(tempfile.gettempdir()) / f"rivulet-kernels-{os.getuid()}"
    directory.mkdir(parents=True, exist_ok=True)
    library = directory / f"native_kernels-{key.hexdigest()[:16]}.so"
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

"""Builds and loads models/native_kernels.c: CPU kernels for the decode step, in C.

Where the machine has a C compiler, the library is built at start-up (under a second) with
``-march=native``, cached per source and CPU in the temp directory, and shared by the workers of one
machine. Where it has none (the Docker image), a library built ahead of time is loaded instead: the
image's build compiles one per x86-64 level (``python -m models.native_build --prebuild DIR``, into
``models/native_prebuilt``) and the best level this CPU runs is chosen. Either is loaded with ctypes,
which frees the GIL while a kernel runs. With neither, ``load`` returns None once, logged, and the
callers serve through torch as before: a missing kernel is never a reason not to serve.
"""
from __future__ import annotations

import argparse
import ctypes
import hashlib
import logging
import os
import platform
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

log = logging.getLogger("rivulet.engine")

SOURCE = Path(__file__).with_name("native_kernels.c")
PREBUILT = Path(__file__).with_name("native_prebuilt")
FLAGS = ("-O3", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC")
# x86-64 micro-architecture levels, best first, with the /proc/cpuinfo flags each needs (beyond the lower).
X86_LEVELS = {
    "x86-64-v4": {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"},
    "x86-64-v3": {"avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe", "xsave"},
    "x86-64-v2": {"cx16", "lahf_lm", "popcnt", "sse4_1", "sse4_2", "ssse3"},
}

_library: ctypes.CDLL | None = None
load_error: str | None = None


def load(cache_dir: Path | None = None, prebuilt: Path | None = None) -> ctypes.CDLL | None:
    """The kernels' library (once per process): built here, else built ahead of time; None with neither."""
    global _library, load_error
    if _library is not None or load_error is not None:
        return _library
    try:
        try:
            path = build(cache_dir)
        except (OSError, subprocess.SubprocessError, RuntimeError):
            path = prebuilt_for_this_cpu(prebuilt or PREBUILT)
            if path is None:
                raise
        _library = ctypes.CDLL(str(path))
    except (OSError, subprocess.SubprocessError, RuntimeError) as exc:
        load_error = f"{type(exc).__name__}: {exc}"
        log.warning("native CPU kernels unavailable (decode steps run through torch): %s", load_error)
        return None
    log.info("native CPU kernels: %s", path)
    return _library


def source_key() -> str:
    return hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:16]


def build(cache_dir: Path | None = None) -> Path:
    """Compile the kernels for this CPU unless this source already is. -> the shared library's path.
    Raises RuntimeError without a compiler, SubprocessError when compiling fails."""
    # -march=native: the library is for this CPU only, so the CPU is part of its name.
    key = hashlib.sha256(" ".join((source_key(), *FLAGS, platform.machine(), _cpu_flags_line())).encode())
    directory = cache_dir or Path(tempfile.gettempdir()) / f"rivulet-kernels-{os.getuid()}"
    private_directory(directory)
    library = directory / f"native_kernels-{key.hexdigest()[:16]}.so"
    if library.exists():
        return library
    return compile_library(library, "-march=native")


def private_directory(directory: Path) -> None:
    """Create ``directory`` for this user alone, or check that it is: a library found in it is loaded and
    run, so nobody else may be able to put one there (the temp directory is shared). Raises RuntimeError."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = directory.lstat()
    if (stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid()
            or info.st_mode & 0o022):
        raise RuntimeError(f"{directory} is not a directory only this user can write: nothing is loaded from it")


def compile_library(library: Path, *arch_flags: str) -> Path:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if not compiler:
        raise RuntimeError("no C compiler (cc, gcc or $CC)")
    partial = library.with_name(f"{library.name}.{os.getpid()}.tmp")
    from models.subprocesses import real_subprocess  # gevent's subprocess fails off the loop's thread

    with real_subprocess():
        done = subprocess.run([compiler, *FLAGS, *arch_flags, str(SOURCE), "-o", str(partial), "-lm"],
                              capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        partial.unlink(missing_ok=True)
        raise subprocess.SubprocessError(f"{compiler} failed: {done.stderr.strip()[-2000:]}")
    os.replace(partial, library)  # atomic: workers building at once each see a whole library
    return library


def prebuild(directory: Path) -> list[Path]:
    """Libraries of this source for every x86-64 level (on x86-64; one generic build elsewhere), named by
    the source's hash so that a changed source never loads a stale library. -> their paths"""
    directory.mkdir(parents=True, exist_ok=True)
    if platform.machine() in ("x86_64", "AMD64"):
        return [compile_library(directory / f"native_kernels-{source_key()}-{level}.so", f"-march={level}")
                for level in X86_LEVELS]
    return [compile_library(directory / f"native_kernels-{source_key()}-generic.so")]


def prebuilt_for_this_cpu(directory: Path, cpu_flags: set[str] | None = None) -> Path | None:
    """The best library built ahead of time for this source that this CPU can run, if any."""
    flags = _cpu_flags() if cpu_flags is None else cpu_flags
    needed: set[str] = set()
    runnable = []
    for level, level_flags in reversed(X86_LEVELS.items()):  # lowest first: each level needs the lower ones
        needed |= level_flags
        if needed <= flags:
            runnable.append(level)
    for level in [*reversed(runnable), "generic"]:
        path = directory / f"native_kernels-{source_key()}-{level}.so"
        if path.exists():
            return path
    return None


def _cpu_flags_line() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor()


def _cpu_flags() -> set[str]:
    return set(_cpu_flags_line().partition(":")[2].split())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Build the native CPU kernels ahead of time (the image's build).")
    parser.add_argument("--prebuild", type=Path, default=PREBUILT, help="where the libraries go")
    args = parser.parse_args(argv)
    for path in prebuild(args.prebuild):
        print(path)


if __name__ == "__main__":
    main()

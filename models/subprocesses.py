"""The standard library's own process functions, where gevent has patched them.

Compilers run as subprocesses (inductor's C++ compiler, the native kernels' C compiler), and they run on
the engine thread, where the model lives, not on the thread of gevent's loop.
"""
from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

# What starting a compiler and waiting for it touches, as gevent may have patched it: its versions wait
# on the main thread's loop (child watchers exist only there), so on another thread they fail (subprocess)
# or hang (os.waitpid). The smallest set that compiles under gunicorn (tests/integration/test_compile.py).
_PROCESS_MODULES = ("subprocess", "os")


@contextlib.contextmanager
def real_subprocess() -> Iterator[None]:
    """The standard library's own process functions for the duration, where gevent has patched them.

    Inductor runs the C++ compiler with ``subprocess``, and the compile runs on the engine thread (where
    the model lives), not on the thread of gevent's loop. Only for the warm-up at start-up, while the
    web side answers no more than health checks (which start no process)."""
    monkey = sys.modules.get("gevent.monkey")
    saved = getattr(monkey, "saved", {}) if monkey is not None else {}
    restored = []
    for module_name in _PROCESS_MODULES:
        module = sys.modules.get(module_name)
        for name, original in saved.get(module_name, {}).items():
            if module is not None and hasattr(module, name):
                restored.append((module, name, getattr(module, name)))
                setattr(module, name, original)
    try:
        yield
    finally:
        for module, name, patched in reversed(restored):
            setattr(module, name, patched)

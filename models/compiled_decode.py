"""The decode step through ``torch.compile`` (RIVULET_COMPILE=1), with eager as the fallback.

On a CPU a small model's decode step is bound by dispatching ~1,400 small operations as much as by its
arithmetic; inductor fuses the elementwise ones into a few C++ loops. Measured on a 2-core VM (bench-512,
fp32, engine alone, batch 1, two threads): 7.2-9.0 ms eager, 5.6-6.8 ms compiled (bench/README.md
section 10).

The price is start-up time: each kind of step is compiled once, at load, before the worker says ready
(tens of seconds on a small CPU), and a C++ compiler must be on the machine. So it is off by default.
Anything that fails to compile is logged and the step runs eager: compiling is an optimisation, never a
reason not to serve.

On a CPU a batch-1 step runs the native one-row step (models/native_step.py) where the C kernels build,
else a library compiled ahead of time (models/exported_decode.py); either serves it without this
module's per-call overhead, and the batch-1 graph compiled here is their fallback.

Only the plain decode step is compiled: a step with a long prompt's chunk, or with rows attending alone,
has a shape of its own each time and runs eager. On a CPU the compiled kernels keep the thread count they
were compiled with (inductor writes it into their OpenMP pragmas), so they are compiled for every usable
core and serve the steps that the runner's thread policy gives every core (few streams: where a step's
speed is a user's speed); a step given fewer threads (the hub busy with many streams) runs eager.
Inductor's ``cpp.dynamic_threads`` (kernels that take the thread count of the moment) was measured too:
it lost the whole gain (7.4-8.0 ms against 5.6-5.7 ms baked, 7.2-7.5 ms eager).
"""
from __future__ import annotations

import logging
import time

import torch

from models.llama import Llama
from models.subprocesses import real_subprocess

log = logging.getLogger("rivulet.engine")


class CompiledDecode:
    def __init__(self, model: Llama, threads: int | None = None) -> None:
        """``threads``: the torch threads to compile the CPU kernels for (None: not a CPU)."""
        # Compile in this process: the engine thread runs inside a gevent worker, where a pool of compile
        # subprocesses is one more thing to go wrong, for a once-per-start saving.
        import torch._inductor.config as inductor_config

        inductor_config.compile_threads = 1
        self.model = model
        # Batch size and key count vary every step: symbolic, not one graph per value. No guards on the
        # model's modules: checking them before every step cost 0.22 ms of a 4.6 ms batch-1 step (against
        # 0.08 ms without), and nothing changes the modules' structure once the warm-up has compiled them
        # (a weight replaced later is still read at each call: tests/models/test_compiled_decode.py).
        self._compiled = torch.compile(model.decode, dynamic=True, options={
            "guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe})
        self.threads = threads
        self.error: str | None = None
        self.steps = 0  # steps the compiled kernels ran (not the warm-up's)

    def serves(self, threads: int) -> bool:
        """Whether a step run with ``threads`` torch threads goes through the compiled kernels."""
        return self.error is None and (self.threads is None or threads == self.threads)

    def warm_up(self, max_batch: int) -> None:
        """Compile every kind of plain decode step the engine will run: batch 1 (never ragged), and a batch
        of several rows of one length or of several. It writes into the first cache rows, which every
        prefill overwrites before they serve.

        One compiled model per process: compiled steps are cached by the code they compile (``Llama.decode``,
        the same for every model) and, with the modules' guards skipped, could not tell another model's
        apart. So the warm-up forgets what an earlier one compiled (a worker serves one model; tests
        make several)."""
        started = time.perf_counter()
        torch._dynamo.reset()
        torch.compiler.set_stance("default")  # an earlier warm-up's stance would run this one eager
        device = self.model.lm_head.weight.device
        shapes = [(1, False)] + ([(2, False), (2, True)] if max_batch >= 2 else [])
        threads_before = torch.get_num_threads()
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode(), real_subprocess():
                for batch, ragged in shapes:
                    positions = torch.arange(batch, device=device) + 2 if ragged else torch.full(
                        (batch,), 2, device=device)
                    tokens = torch.zeros(batch, dtype=torch.long, device=device)
                    self._compiled(tokens, positions, int(positions.max()) + 1, ragged)
        except Exception as exc:  # no compiler, an unsupported op: serve eager
            self.error = f"{type(exc).__name__}: {exc}"
            log.warning("RIVULET_COMPILE: the decode step did not compile, it runs eager: %s", self.error)
            return
        finally:
            torch.set_num_threads(threads_before)
        # From now on a step of a shape not compiled runs eager instead of compiling in the middle of serving
        # (seconds of stall, and the engine thread cannot spawn a compiler under gevent).
        torch.compiler.set_stance("eager_on_recompile")
        log.info("RIVULET_COMPILE: decode step compiled in %.1f s%s", time.perf_counter() - started,
                 f" for {self.threads} threads" if self.threads is not None else "")

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, length: int, ragged: bool) -> torch.Tensor:
        if self.error is not None:
            return self.model.decode(tokens, positions, length, ragged)
        self.steps += 1
        return self._compiled(tokens, positions, length, ragged)

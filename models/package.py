"""Model packages, the Inferless way: ``app.py`` + ``input_schema.py`` in a directory, run on the engine thread.

``app.py`` defines ``InferlessPythonModel`` (or ``Model``) with ``initialize()``, ``infer(inputs,
stream_output_handler)`` and ``finalize()``; ``input_schema.py`` defines ``INPUT_SCHEMA`` and
``IS_STREAMING_OUTPUT``. The engine thread imports the package, runs ``initialize()`` before the service
says ready, then runs one ``infer`` at a time to completion (packages are not batched: their code owns
the device while it runs), and ``finalize()`` at shutdown.

Package code is someone else's, so every edge of it is guarded: each output is checked (a dict of JSON
values with the first output's schema); a request whose client left or whose time ran out makes the next
``send_streamed_output`` raise ``StreamClosed`` so that ``infer`` stops at once; an ``infer`` that raises
ends its stream with an error event; one that forgets ``finalise_streamed_output()`` is finalised for it.
Whatever happens, the request ends exactly once (``Scheduler.finish``) and the engine thread moves on.
"""
from __future__ import annotations

import contextlib
import importlib.util
import inspect
import itertools
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import torch

from models.api import PackageOutput, PackageRequest
from models.errors import CheckpointError, ModelError
from models.package_output import OutputSchema, json_copy
from models.package_schema import InputSchema
from models.runtime_config import check_runtime
from models.scheduler import FINISHED, Scheduler, Ticket, error_for

log = logging.getLogger("rivulet.package")

APP_FILE, SCHEMA_FILE = "app.py", "input_schema.py"
MODEL_CLASS_NAMES = ("InferlessPythonModel", "Model")  # looked up in app.py, in this order
_module_ids = itertools.count()


def is_package_dir(path: str | Path) -> bool:
    """A model package is a directory with an ``app.py`` (a Llama checkpoint has none)."""
    return (Path(path) / APP_FILE).is_file()


@dataclass(frozen=True)
class PackageContext:
    """Passed to ``initialize(context)`` and ``finalize(context)`` when they take an argument.

    Inferless's own ``initialize(self)`` takes none and keeps working; a package that wants to run on the
    device Rivulet chose for this worker (``RIVULET_DEVICE``) asks for the context.
    """

    directory: Path
    device: torch.device


class StreamClosed(BaseException):
    """Raised inside ``infer`` by ``send_streamed_output`` once the request is over: stop now.

    ``reason``: cancelled (the client left), timeout, error (a bad output), or finished (sent after
    ``finalise_streamed_output()``). A BaseException, like GeneratorExit and for the same reason: package
    code often wraps its loop in ``except Exception`` (Inferless's examples do), which must not swallow the
    order to stop.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"the stream is closed ({reason}); infer should return")
        self.reason = reason


class StreamOutputHandler:
    """``infer``'s ``stream_output_handler``: one per request. Call it from ``infer``'s own thread."""

    def __init__(self, scheduler: Scheduler, ticket: Ticket) -> None:
        self._scheduler = scheduler
        self._ticket = ticket
        self._schema = OutputSchema()
        self.finalised = False

    def send_streamed_output(self, output: dict[str, Any]) -> None:
        """Send one event. Raises StreamClosed when the request is over (and ends it if it must end now)."""
        self._raise_if_closed()
        try:
            data = json_copy(output)
            self._schema.check(data)
        except ModelError as exc:
            log.warning("request %s: %s", self._ticket.request_id, exc.message)
            self._scheduler.finish(self._ticket, "error", exc)
            raise StreamClosed("error") from None
        self._ticket.completion_tokens += 1  # an output is a package's unit of generation
        self._ticket.sink.put(PackageOutput(data))

    def finalise_streamed_output(self) -> None:
        """End the stream (``[DONE]``). Calling it again, or after the request ended, does nothing."""
        if self._ticket.state != FINISHED:
            self.finalised = True
            self._scheduler.finish(self._ticket, "stop")

    finalize_streamed_output = finalise_streamed_output  # the American spelling, for convenience

    def _raise_if_closed(self) -> None:
        ticket = self._ticket
        if ticket.state == FINISHED:
            raise StreamClosed("finished")
        reason = ticket.stop_reason(time.monotonic())
        if reason:
            self._scheduler.finish(ticket, reason, error_for(reason))
            raise StreamClosed(reason)


class PackageBackend:
    """The engine's Backend for a model package."""

    kind = "package"

    def __init__(self, directory: str | Path, device: torch.device | str) -> None:
        self.directory = Path(directory)
        self.device = torch.device(device)
        self.name = self.directory.name
        # The schema is read here, early and cheaply (no model code runs): a bad one stops start-up, and
        # the web side can validate requests with it. app.py is imported on the engine thread (load).
        schema_module = _import_file(self.directory / SCHEMA_FILE)
        if not hasattr(schema_module, "INPUT_SCHEMA"):
            raise CheckpointError(f"{self.directory / SCHEMA_FILE} defines no INPUT_SCHEMA")
        self.input_schema = InputSchema.from_declaration(schema_module.INPUT_SCHEMA, SCHEMA_FILE)
        streaming = getattr(schema_module, "IS_STREAMING_OUTPUT", False)  # absent: Inferless's default
        if not isinstance(streaming, bool):
            raise CheckpointError(f"{SCHEMA_FILE}: IS_STREAMING_OUTPUT must be True or False, not {streaming!r}")
        self.is_streaming = streaming
        self.context = PackageContext(self.directory, self.device)
        self.model: Any = None
        self._warned_unfinalised = False

    # --- the engine thread ---------------------------------------------------------------------

    def load(self) -> None:
        """Import app.py and run ``initialize()``: on the engine thread, where the device is used."""
        check_runtime(self.directory)  # its inferless-runtime-config.yaml: refuse before any of its code runs
        module = _import_file(self.directory / APP_FILE)
        model_class = _model_class(module, self.is_streaming)
        self.model = model_class()
        if callable(getattr(self.model, "initialize", None)):
            _call_with_context(self.model.initialize, self.context)
        log.info("package %s ready (%s, %s)", self.directory, model_class.__name__,
                 "streaming" if self.is_streaming else "one output per request")

    def step(self, scheduler: Scheduler) -> None:
        """Run one request's ``infer`` to completion; the engine reaps and admits between calls."""
        for ticket in scheduler.admit(limit=1):
            self._serve(scheduler, ticket)

    def release(self, ticket: Ticket) -> None:
        """Nothing to free per request: a package's state lives in its model object."""

    def close(self) -> None:
        model, self.model = self.model, None
        if model is not None and callable(getattr(model, "finalize", None)):
            try:
                _call_with_context(model.finalize, self.context)
            except Exception:  # shutdown goes on; the package's failure is logged, not hidden
                log.exception("finalize() of package %s raised", self.name)

    def _serve(self, scheduler: Scheduler, ticket: Ticket) -> None:
        request: PackageRequest = ticket.request
        handler = StreamOutputHandler(scheduler, ticket)
        ticket.work = handler
        inputs = dict(request.inputs)  # infer may mutate its copy
        try:
            if self.is_streaming:
                self.model.infer(inputs, handler)
            else:
                handler.send_streamed_output(self.model.infer(inputs))
                handler.finalise_streamed_output()
        except StreamClosed:
            return  # raised only after the request was ended (cancel, timeout, bad output, already finished)
        except Exception as exc:  # the package's failure ends this request only
            log.exception("infer of package %s failed for request %s", self.name, ticket.request_id)
            scheduler.finish(ticket, "error", ModelError(f"infer failed: {type(exc).__name__}: {exc}"))
            return
        if ticket.state != FINISHED:
            self._finish_unfinalised(scheduler, ticket)

    def _finish_unfinalised(self, scheduler: Scheduler, ticket: Ticket) -> None:
        reason = ticket.stop_reason(time.monotonic())
        if reason:  # it returned without sending again after the client left or time ran out
            scheduler.finish(ticket, reason, error_for(reason))
            return
        if not self._warned_unfinalised:  # once: a package that forgets, forgets on every request
            self._warned_unfinalised = True
            log.warning("package %s: infer returned without calling finalise_streamed_output(); Rivulet "
                        "ends such streams itself (this warning is logged once)", self.name)
        scheduler.finish(ticket, "stop")


def _import_file(path: Path) -> ModuleType:
    """Import one of the package's files under a unique module name (several packages may share a process)."""
    if not path.is_file():
        raise CheckpointError(f"{path.parent} has no {path.name}: a model package needs {APP_FILE} and "
                              f"{SCHEMA_FILE}")
    module_name = f"_rivulet_package_{next(_module_ids)}_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise CheckpointError(f"{path} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickle look a module up here while it imports
    # The package's own helper modules (``import utils`` next to app.py) resolve from its directory.
    sys.path.insert(0, str(path.parent))
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise CheckpointError(f"{path} failed to import: {type(exc).__name__}: {exc}") from exc
    finally:
        with contextlib.suppress(ValueError):
            sys.path.remove(str(path.parent))
    return module


def _model_class(module: ModuleType, streaming: bool) -> type:
    for name in MODEL_CLASS_NAMES:
        model_class = getattr(module, name, None)
        if isinstance(model_class, type):
            break
    else:
        raise CheckpointError(f"{APP_FILE} defines no class {' or '.join(MODEL_CLASS_NAMES)}")
    infer = getattr(model_class, "infer", None)
    if not callable(infer):
        raise CheckpointError(f"{APP_FILE}: {model_class.__name__} has no infer method")
    # Refuse a mismatch between the schema file and infer's signature now, not on the first request.
    expected = "(self, inputs, stream_output_handler)" if streaming else "(self, inputs)"
    args = (None, {}, None) if streaming else (None, {})
    try:
        inspect.signature(infer).bind(*args)
    except TypeError:
        raise CheckpointError(f"{APP_FILE}: {model_class.__name__}.infer must take {expected} because "
                              f"{SCHEMA_FILE} sets IS_STREAMING_OUTPUT = {streaming}") from None
    return model_class


def _call_with_context(method: Callable[..., Any], context: PackageContext) -> Any:
    """Call ``initialize`` / ``finalize`` with the context if they take an argument, else without."""
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                  inspect.Parameter.VAR_POSITIONAL)
    try:
        takes_argument = any(p.kind in positional for p in inspect.signature(method).parameters.values())
    except (TypeError, ValueError):  # a builtin without a signature: call it the Inferless way
        takes_argument = False
    return method(context) if takes_argument else method()

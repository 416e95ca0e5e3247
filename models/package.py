"""Model packages, the Inferless way: ``app.py`` + ``input_schema.py`` in a directory, run on the engine thread.

``app.py`` defines ``InferlessPythonModel`` (or ``Model``) with ``initialize()``, ``infer(inputs,
stream_output_handler)`` and ``finalize()``; ``input_schema.py`` defines ``INPUT_SCHEMA`` and
``IS_STREAMING_OUTPUT``. The engine thread imports the package, runs ``initialize()`` before the service
says ready, then runs one ``infer`` at a time to completion (packages are not batched: their code owns
the device while it runs), and ``finalize()`` at shutdown.

Package code is someone else's, so every edge of it is guarded: each output is checked (a dict of JSON
values with the first output's schema); a request whose client left or whose time ran out gets its last
event at once, and ``infer`` either runs on with its outputs discarded (the default: nothing it leaves
behind can reach the next request) or is stopped by ``StreamClosed`` (packages that declare
``RAISE_ON_CANCEL = True``); an ``infer`` that raises ends its stream with an error event; one that
forgets ``finalise_streamed_output()`` is finalised for it. Whatever happens, the request ends exactly
once and the engine thread moves on only when ``infer`` has returned.
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

from models.api import ERROR, STOP, PackageOutput, PackageRequest
from models.errors import CheckpointError, ModelError
from models.outputs import Ended, Output
from models.package_output import OutputSchema, json_copy
from models.package_schema import InputSchema
from models.runtime_config import check_runtime
from models.scheduler import FINISHED, Batch, Ticket

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
    """Raised inside ``infer`` by ``send_streamed_output`` once the request is over, for packages that
    asked to stop early (``RAISE_ON_CANCEL = True`` in input_schema.py): return now.

    ``reason``: cancelled (the client left), timeout, error (a bad output), or finished (sent after
    ``finalise_streamed_output()``). A BaseException, like GeneratorExit and for the same reason: package
    code often wraps its loop in ``except Exception`` (Inferless's examples do), which must not swallow the
    order to stop.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"the stream is closed ({reason}); infer should return")
        self.reason = reason


class StreamOutputHandler:
    """``infer``'s ``stream_output_handler``: one per request.

    Once the request is over (its client left, its time ran out, an output was refused, or it was
    finalised), the client has had its last event. What ``send_streamed_output`` does then depends on
    the package: by default it discards the output and returns, so ``infer`` runs to its own end and
    leaves nothing behind for the next request (a generation thread still filling a streamer kept on
    ``self``, as Inferless's templates do, would otherwise hand its leftover text to the next caller).
    A package that declares ``RAISE_ON_CANCEL = True`` gets ``StreamClosed`` raised instead, to stop
    at once; it promises that stopping early leaves no state behind. Either way ``cancelled`` tells
    ``infer`` (or its generation thread) that nobody is listening any more.
    """

    def __init__(self, ticket: Ticket, *, raise_on_cancel: bool) -> None:
        self._ticket = ticket
        self._raise_on_cancel = raise_on_cancel
        self._schema = OutputSchema()

    @property
    def cancelled(self) -> bool:
        """True once the request is over for its client: poll it to stop a generation early."""
        return self._ticket.state == FINISHED or self._ticket.stop_reason(time.monotonic()) is not None

    def send_streamed_output(self, output: dict[str, Any]) -> None:
        """Send one event. After the end: discard it (or raise StreamClosed, see the class docstring)."""
        if self._close_if_over():
            return
        try:
            data = json_copy(output)
            self._schema.check(data)
        except ModelError as exc:
            log.warning("request %s: %s", self._ticket.request_id, exc.message)
            self._ticket.end(ERROR, exc)
            self._closed(ERROR)
            return
        self._ticket.completion_tokens += 1  # an output is a package's unit of generation
        self._ticket.sink.put(PackageOutput(data))

    def finalise_streamed_output(self) -> None:
        """End the stream (``[DONE]``). After a cancel or past the deadline the stream keeps that ending;
        calling it again, or after the request ended, does nothing."""
        if not self._close_if_over(finalising=True):
            self._ticket.end(STOP)

    finalize_streamed_output = finalise_streamed_output  # the American spelling, for convenience

    def _close_if_over(self, *, finalising: bool = False) -> bool:
        """End the request if its client left or its time ran out. -> whether it is over (after
        raising StreamClosed, for packages that asked for it)."""
        ticket = self._ticket
        if ticket.state == FINISHED:
            reason = "finished"
        else:
            reason = ticket.stop_reason(time.monotonic())
            if reason is None:
                return False
            ticket.end(reason)
        if not finalising:
            self._closed(reason)
        return True

    def _closed(self, reason: str) -> None:
        """The output is dropped; packages that asked to stop early are told so."""
        if self._raise_on_cancel:
            raise StreamClosed(reason)


class PackageBackend:
    """The engine's Backend for a model package: one ``infer`` at a time, each a whole step."""

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
        self.is_streaming = _flag(schema_module, "IS_STREAMING_OUTPUT")  # absent: Inferless's default
        self.raise_on_cancel = _flag(schema_module, "RAISE_ON_CANCEL")  # absent: drain, the safe default
        self.context = PackageContext(self.directory, self.device)
        self.model: Any = None
        self._warned_unfinalised = False
        # Requests whose client left (or whose time ran out) while infer went on: the engine thread
        # stayed with them until infer returned. Written by the engine thread only.
        self.drained_requests = 0

    # --- the engine thread ---------------------------------------------------------------------

    def load(self) -> None:
        """Import app.py and run ``initialize()``: on the engine thread, where the device is used."""
        check_runtime(self.directory)  # its inferless-runtime-config.yaml: refuse before any of its code runs
        module = _import_file(self.directory / APP_FILE)
        model_class = _model_class(module, self.is_streaming)
        self.model = model_class()
        if callable(getattr(self.model, "initialize", None)):
            _call_with_context(self.model.initialize, self.context)
        log.info("package %s ready (%s, %s, %s on cancel)", self.directory, model_class.__name__,
                 "streaming" if self.is_streaming else "one output per request",
                 "stops early" if self.raise_on_cancel else "drains")

    def free_slots(self) -> int:
        return 1  # execute runs one infer to its end, so between steps the package is always free

    def execute(self, batch: Batch) -> list[Output]:
        """Run one request's ``infer`` to its end (a package holds the engine thread while it runs)."""
        return [self._serve(ticket) for ticket in batch.prefill]

    def release(self, ticket: Ticket) -> None:
        """Nothing to free per request: a package's state lives in its model object."""

    def close(self) -> None:
        model, self.model = self.model, None
        if model is not None and callable(getattr(model, "finalize", None)):
            try:
                _call_with_context(model.finalize, self.context)
            except Exception:  # shutdown goes on; the package's failure is logged, not hidden
                log.exception("finalize() of package %s raised", self.name)

    def _serve(self, ticket: Ticket) -> Ended:
        request: PackageRequest = ticket.request
        handler = StreamOutputHandler(ticket, raise_on_cancel=self.raise_on_cancel)
        ticket.work = handler
        inputs = dict(request.inputs)  # infer may mutate its copy
        try:
            if self.is_streaming:
                self.model.infer(inputs, handler)
            else:
                handler.send_streamed_output(self.model.infer(inputs))
                handler.finalise_streamed_output()
        except StreamClosed as closed:  # raised only after the request was ended
            return Ended(ticket, closed.reason)
        except Exception as exc:  # the package's failure ends this request only
            log.exception("infer of package %s failed for request %s", self.name, ticket.request_id)
            return Ended(ticket, ERROR, ModelError(f"infer failed: {type(exc).__name__}: {exc}"))
        if ticket.stop_reason(time.monotonic()):  # its client left or its time ran out while infer ran
            self.drained_requests += 1
        return self._after_return(ticket)

    def _after_return(self, ticket: Ticket) -> Ended:
        reason = ticket.stop_reason(time.monotonic())
        if ticket.state == FINISHED or reason:  # ended already, or nothing was sent after the client left
            return Ended(ticket, reason or STOP)
        if not self._warned_unfinalised:  # once: a package that forgets, forgets on every request
            self._warned_unfinalised = True
            log.warning("package %s: infer returned without calling finalise_streamed_output(); Rivulet "
                        "ends such streams itself (this warning is logged once)", self.name)
        return Ended(ticket, STOP)


def _flag(module: ModuleType, name: str) -> bool:
    value = getattr(module, name, False)
    if not isinstance(value, bool):
        raise CheckpointError(f"{SCHEMA_FILE}: {name} must be True or False, not {value!r}")
    return value


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

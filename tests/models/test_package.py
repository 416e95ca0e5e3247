"""PackageBackend driven by a real Engine thread, as the service runs it (minus gevent: the sink is a queue)."""
from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from models.api import Finished, PackageOutput, PackageRequest
from models.engine import STARTING, Engine
from models.errors import CheckpointError, ModelError, RequestTimeout
from models.package import PackageBackend, is_package_dir
from tests.models.support import wait_for

ROOT = Path(__file__).resolve().parents[2]
WORDS = ROOT / "models" / "packages" / "words"
LIFE = ROOT / "models" / "packages" / "life"
FIXTURES = ROOT / "tests" / "fixtures"
INFERLESS = FIXTURES / "inferless_package"
MISBEHAVING = FIXTURES / "packages" / "misbehaving"
NON_STREAMING = FIXTURES / "packages" / "non_streaming"
BAD_SCHEMA = FIXTURES / "packages" / "bad_schema"
WAIT_S = 30  # generous bound on waits that should take milliseconds; never asserted on

_ids = itertools.count()


class QueueSink:
    """The engine thread's side of a request, as the service's channel would receive it."""

    def __init__(self) -> None:
        self.events: queue.Queue = queue.Queue()
        self.puts = 0  # how many events the engine thread has put so far

    def put(self, event) -> None:
        self.puts += 1
        self.events.put(event)

    def next(self):
        return self.events.get(timeout=WAIT_S)

    def until_finished(self) -> tuple[list[dict], Finished]:
        outputs = []
        while True:
            event = self.next()
            if isinstance(event, Finished):
                return outputs, event
            assert isinstance(event, PackageOutput)
            outputs.append(event.data)


@contextlib.contextmanager
def running(directory: Path, **engine_args) -> Iterator[Engine]:
    engine = Engine(PackageBackend(directory, torch.device("cpu")),
                    max_batch=engine_args.get("max_batch", 4), max_waiting=engine_args.get("max_waiting", 16))
    thread = threading.Thread(target=engine.run, name="test-engine", daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT_S
    while engine.state == STARTING and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield engine
    finally:
        engine.shutdown()
        thread.join(WAIT_S)


def submit(engine: Engine, body: dict, *, timeout_s: float = WAIT_S, sink: QueueSink | None = None):
    inputs = engine.backend.input_schema.parse(body)
    sink = sink or QueueSink()
    request = PackageRequest(f"req-{next(_ids)}", inputs, time.monotonic() + timeout_s)
    return engine.submit(request, sink), sink


@pytest.fixture
def package_log(tmp_path, monkeypatch) -> Path:
    """Where the misbehaving fixture records how each infer ended."""
    path = tmp_path / "package.log"
    monkeypatch.setenv("MISBEHAVING_PACKAGE_LOG", str(path))
    return path


def recorded(path: Path) -> list[str]:
    """How each infer ended, in order (without the "- finalized" line of shutdown)."""
    lines = path.read_text().splitlines() if path.exists() else []
    return [line for line in lines if not line.startswith("- ")]


# --- streaming --------------------------------------------------------------------------------------


def test_words_streams_one_event_per_word_then_stops():
    with running(WORDS) as engine:
        assert engine.ready
        _, sink = submit(engine, {"prompt": "one two  three", "delay_ms": 0})
        outputs, finished = sink.until_finished()
    assert outputs == [{"index": 0, "word": "one"}, {"index": 1, "word": "two"}, {"index": 2, "word": "three"}]
    assert (finished.reason, finished.error, finished.completion_tokens) == ("stop", None, 3)


def test_inferless_package_runs_unchanged_from_a_kserve_body():
    body = {"inputs": [
        {"name": "prompt", "shape": [1], "datatype": "BYTES", "data": ["a fine house in the forest"]},
        {"name": "max_words", "shape": [1], "datatype": "INT32", "data": [3]},
        {"name": "upper", "shape": [1], "datatype": "BOOL", "data": [True]},
    ]}
    with running(INFERLESS) as engine:
        _, sink = submit(engine, body)
        outputs, finished = sink.until_finished()
    assert [o["OUT"] for o in outputs] == ["A", "FINE", "HOUSE"]
    assert outputs[1]["meta"] == '{"length": 4}'
    assert finished.reason == "stop"


def test_torch_package_runs_on_the_engine_device_one_event_per_step():
    with running(LIFE) as engine:
        assert engine.backend.model.device == torch.device("cpu")  # initialize(context) got the device
        _, sink = submit(engine, {"pattern": "glider", "steps": 4, "size": 8})
        outputs, finished = sink.until_finished()
    assert [o["step"] for o in outputs] == [0, 1, 2, 3, 4]
    assert all(o["alive"] == 5 for o in outputs)  # a glider keeps its five cells
    first, last = outputs[0]["board"].split("\n"), outputs[4]["board"].split("\n")
    # after four generations a glider is the same shape, one cell down and one to the right
    assert [row[-1] + row[:-1] for row in first[-1:] + first[:-1]] == last
    assert finished.reason == "stop"


def test_torch_package_bad_input_ends_with_an_error():
    with running(LIFE) as engine:
        _, sink = submit(engine, {"pattern": "x?x"})
        outputs, finished = sink.until_finished()
    assert outputs == []
    assert finished.reason == "error" and "pattern must be one of" in finished.error.message


def test_packages_run_one_infer_at_a_time_in_order(package_log):
    shared = QueueSink()
    with running(MISBEHAVING) as engine:
        for tag in ("a", "b", "c"):
            submit(engine, {"mode": "ok", "count": 3, "interval_ms": 5, "tag": tag}, sink=shared)
        events = [shared.next() for _ in range(12)]
        wait_for(lambda: engine.running_count == 0, what="the last infer to return")
    # every output of a request comes before the next request's first: no interleaving
    kinds = ["F" if isinstance(e, Finished) else "o" for e in events]
    assert kinds == ["o", "o", "o", "F"] * 3
    assert recorded(package_log) == ["a returned", "b returned", "c returned"]


# --- packages that misbehave ------------------------------------------------------------------------


def test_forgotten_finalise_is_finalised_and_warned_once(caplog):
    caplog.set_level(logging.WARNING, logger="rivulet.package")
    with running(MISBEHAVING) as engine:
        results = [submit(engine, {"mode": "forget", "count": 2})[1].until_finished() for _ in range(2)]
    for outputs, finished in results:
        assert outputs == [{"tick": 0}, {"tick": 1}]
        assert (finished.reason, finished.error) == ("stop", None)
    warnings = [r for r in caplog.records if "finalise_streamed_output" in r.getMessage()]
    assert len(warnings) == 1


def test_exception_mid_stream_ends_with_a_model_error_and_the_engine_goes_on():
    with running(MISBEHAVING) as engine:
        outputs, finished = submit(engine, {"mode": "raise"})[1].until_finished()
        after = submit(engine, {"mode": "ok", "count": 1})[1].until_finished()
    assert outputs == [{"tick": 0}]
    assert finished.reason == "error" and isinstance(finished.error, ModelError)
    assert finished.error.message == "infer failed: RuntimeError: boom after one output"
    assert after == ([{"tick": 0}], Finished("stop", 0, 1, None))


def test_schema_change_ends_the_stream_with_an_error_and_stops_infer(package_log):
    with running(MISBEHAVING) as engine:
        outputs, finished = submit(engine, {"mode": "schema", "tag": "s"})[1].until_finished()
    assert outputs == [{"tick": 0}]
    assert finished.reason == "error"
    assert "schema changed" in finished.error.message and "'tick' was number, now string" in finished.error.message
    assert recorded(package_log) == ["s StreamClosed error"]  # infer did not reach its finalise


@pytest.mark.parametrize("mode, words", [
    ("bytes", "output 'tick' cannot be sent as JSON (bytes"),
    ("nan", "output 'tick' cannot be sent as JSON (float"),
    ("not_a_dict", "an output must be a dict, not list"),
])
def test_values_json_cannot_carry_end_with_a_clear_error(mode, words):
    with running(MISBEHAVING) as engine:
        _, finished = submit(engine, {"mode": mode})[1].until_finished()
        after = submit(engine, {"mode": "ok", "count": 1})[1].until_finished()
    assert finished.reason == "error" and isinstance(finished.error, ModelError)
    assert words in finished.error.message
    assert after[1].reason == "stop"


def test_sending_after_finalise_stops_infer_without_a_second_end(package_log):
    with running(MISBEHAVING) as engine:
        ticket, sink = submit(engine, {"mode": "after_finalise", "tag": "f"})
        outputs, finished = sink.until_finished()
        submit(engine, {"mode": "ok", "count": 1})[1].until_finished()  # the engine moved on
    assert (outputs, finished.reason) == ([{"tick": 0}], "stop")
    assert sink.events.empty() and sink.puts == 2  # exactly one Finished
    assert recorded(package_log)[0] == "f StreamClosed finished"


# --- the engine thread is always released ------------------------------------------------------------


def test_abort_stops_infer_within_one_event(package_log):
    with running(MISBEHAVING) as engine:
        ticket, sink = submit(engine, {"mode": "slow", "interval_ms": 5, "tag": "slow"})
        assert isinstance(sink.next(), PackageOutput)
        engine.abort(ticket)
        put_before_abort = sink.puts
        outputs, finished = sink.until_finished()
        after = submit(engine, {"mode": "ok", "count": 1, "tag": "next"})[1].until_finished()
    # at most the one output being sent as abort() ran; then Finished: infer was stopped at its next send
    assert sink.puts - put_before_abort <= 2
    assert (finished.reason, finished.error) == ("cancelled", None)
    assert recorded(package_log) == ["slow StreamClosed cancelled", "next returned"]
    assert after[1].reason == "stop"


def test_timeout_stops_infer_with_a_timeout_error(package_log):
    with running(MISBEHAVING) as engine:
        _, sink = submit(engine, {"mode": "slow", "interval_ms": 5, "tag": "t"}, timeout_s=0.3)
        outputs, finished = sink.until_finished()
    assert outputs and finished.reason == "timeout" and isinstance(finished.error, RequestTimeout)
    assert recorded(package_log)[0] == "t StreamClosed timeout"


def test_waiting_requests_can_be_cancelled_before_they_run(package_log):
    with running(MISBEHAVING) as engine:
        slow, slow_sink = submit(engine, {"mode": "slow", "interval_ms": 5, "tag": "slow"})
        slow_sink.next()
        queued, queued_sink = submit(engine, {"mode": "ok", "tag": "queued"})
        engine.abort(queued)
        engine.abort(slow)
        assert queued_sink.until_finished() == ([], Finished("cancelled"))
        slow_sink.until_finished()
    assert "queued returned" not in recorded(package_log)


# --- non-streaming -----------------------------------------------------------------------------------


def test_non_streaming_package_sends_one_output_then_stops():
    with running(NON_STREAMING) as engine:
        assert engine.backend.is_streaming is False
        first = submit(engine, {"a": 2, "b": 3})[1].until_finished()
        second = submit(engine, {"a": 1, "b": 1, "negate": True, "label": "x"})[1].until_finished()
        failed = submit(engine, {"a": -1, "b": 1})[1].until_finished()
    assert first == ([{"label": "sum", "value": 5, "calls": 1}], Finished("stop", 0, 1, None))
    assert second[0] == [{"label": "x", "value": -2, "calls": 2}]
    assert failed[0] == [] and failed[1].error.message == "infer failed: ValueError: a must not be negative"


# --- start-up and shutdown ---------------------------------------------------------------------------


def test_is_package_dir():
    assert is_package_dir(WORDS) and is_package_dir(INFERLESS)
    assert not is_package_dir(ROOT / "models" / "demo")


def test_finalize_runs_at_shutdown(package_log):
    with running(MISBEHAVING):
        pass
    assert package_log.read_text() == "- finalized\n"


def test_bad_schema_is_refused_before_any_package_code_runs():
    with pytest.raises(CheckpointError) as caught:
        PackageBackend(BAD_SCHEMA, "cpu")
    assert "INPUT_SCHEMA['temperature']" in caught.value.message and "'FP32'" in caught.value.message


def write_package(directory: Path, app: str, schema: str) -> Path:
    directory.mkdir()
    (directory / "app.py").write_text(app)
    (directory / "input_schema.py").write_text(schema)
    return directory


STREAMING_SCHEMA = ('INPUT_SCHEMA = {"prompt": {"datatype": "STRING", "required": True, "shape": [1]}}\n'
                    'IS_STREAMING_OUTPUT = True\n')
GOOD_APP = ("class InferlessPythonModel:\n"
            "    def infer(self, inputs, stream_output_handler):\n"
            "        stream_output_handler.finalise_streamed_output()\n")


@pytest.mark.parametrize("app, schema, words", [
    (GOOD_APP, "IS_STREAMING_OUTPUT = True\n", "defines no INPUT_SCHEMA"),
    (GOOD_APP, STREAMING_SCHEMA.replace("True\n", "'yes'\n"), "IS_STREAMING_OUTPUT must be True or False"),
    (GOOD_APP, "INPUT_SCHEMA = {\n", "input_schema.py failed to import: SyntaxError"),
])
def test_bad_schema_files_are_refused_at_construction(tmp_path, app, schema, words):
    with pytest.raises(CheckpointError, match=words):
        PackageBackend(write_package(tmp_path / "pkg", app, schema), "cpu")


@pytest.mark.parametrize("app, schema, words", [
    ("class Other:\n    pass\n", STREAMING_SCHEMA, "defines no class InferlessPythonModel or Model"),
    ("import not_a_module_anywhere\n", STREAMING_SCHEMA, "app.py failed to import: ModuleNotFoundError"),
    (GOOD_APP.replace(", stream_output_handler", ""), STREAMING_SCHEMA,
     r"infer must take \(self, inputs, stream_output_handler\)"),
    (GOOD_APP, STREAMING_SCHEMA.replace("True\n", "False\n"), r"infer must take \(self, inputs\)"),
])
def test_bad_app_files_are_refused_at_load(tmp_path, app, schema, words):
    backend = PackageBackend(write_package(tmp_path / "pkg", app, schema), "cpu")
    with pytest.raises(CheckpointError, match=words):
        backend.load()


def test_a_failing_initialize_kills_the_engine_with_its_message(tmp_path):
    app = GOOD_APP + "    def initialize(self):\n        raise OSError('weights not found')\n"
    with running(write_package(tmp_path / "pkg", app, STREAMING_SCHEMA)) as engine:
        assert not engine.ready
        assert "weights not found" in engine.error


def test_the_alternative_class_name_and_helper_modules_next_to_app(tmp_path):
    directory = write_package(tmp_path / "pkg", "from helper_for_test_pkg import shout\n" + GOOD_APP.replace(
        "InferlessPythonModel", "Model").replace(
        "        stream_output_handler.finalise", "        stream_output_handler.send_streamed_output("
        "{'text': shout(inputs['prompt'])})\n        stream_output_handler.finalise"), STREAMING_SCHEMA)
    (directory / "helper_for_test_pkg.py").write_text("def shout(text):\n    return text.upper() + '!'\n")
    with running(directory) as engine:
        outputs, finished = submit(engine, {"prompt": "hey"})[1].until_finished()
    assert outputs == [{"text": "HEY!"}] and finished.reason == "stop"


# --- cancellation: packages written like Inferless's templates are drained, never cut short ----------

DRAINING = FIXTURES / "packages" / "draining"


def test_a_cancelled_request_of_a_draining_package_ends_at_once_while_infer_runs_to_its_end(package_log):
    with running(DRAINING) as engine:
        assert engine.backend.raise_on_cancel is False
        ticket, sink = submit(engine, {"count": 40, "interval_ms": 5, "tag": "a"})
        assert isinstance(sink.next(), PackageOutput)
        engine.abort(ticket)
        outputs, finished = sink.until_finished()
        assert (finished.reason, finished.error) == ("cancelled", None)
        after = submit(engine, {"count": 2, "tag": "b"})[1].until_finished()
        assert engine.backend.drained_requests == 1
    # a discarded output never reaches the client: far fewer than 40 arrived
    assert len(outputs) < 39 and sink.events.empty()
    # infer went on to its own end (all 40 sends) before the next request started
    assert recorded(package_log) == ["a sent 40 cancelled=True", "b sent 2 cancelled=False"]
    assert after == ([{"tick": 0, "call": 2}, {"tick": 1, "call": 2}], Finished("stop", 0, 2, None))


def test_finalising_after_the_deadline_keeps_the_timeout(package_log):
    with running(DRAINING) as engine:
        _, sink = submit(engine, {"count": 30, "interval_ms": 10, "tag": "t"}, timeout_s=0.1)
        outputs, finished = sink.until_finished()
        submit(engine, {"count": 1})[1].until_finished()  # after the drained infer returned
    assert finished.reason == "timeout" and isinstance(finished.error, RequestTimeout)
    assert recorded(package_log)[0] == "t sent 30 cancelled=True"


def test_finalising_after_a_cancel_keeps_cancelled():
    with running(DRAINING) as engine:
        ticket, sink = submit(engine, {"count": 1, "interval_ms": 300})
        assert isinstance(sink.next(), PackageOutput)
        engine.abort(ticket)  # while infer sleeps after its only send; it finalises next
        assert sink.until_finished() == ([], Finished("cancelled", 0, 1, None))

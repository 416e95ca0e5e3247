"""The real engine thread with the real Llama backend on tiny random checkpoints (CPU, fp32)."""
from __future__ import annotations

import threading
import time

import pytest
import torch

from models.api import SamplingParams, TextDelta
from models.errors import ContextLengthExceeded, EngineUnavailable, ModelError, QueueFull, RequestTimeout
from models.sampling import apply_penalties
from tests.models.support import (
    RecordingBackend, RecordingSink, generate, random_model, request, running_engine, tiny_config, wait_for,
    write_checkpoint,
)

CPU = torch.device("cpu")

# A fixed-seed model (torch.manual_seed(3), weights ~ N(0, 0.3)) and its greedy continuation. Each
# step's best logit leads the next by more than 0.03, far above fp32 noise, so kernels may differ.
GOLDEN_PROMPT = [1, 10, 20, 30, 40]
GOLDEN_TOKENS = [269, 340, 331, 392, 50, 397, 332, 231, 267, 338, 288, 317, 231, 212, 81, 30]


@pytest.fixture(scope="module")
def backend(tiny_checkpoint):
    return RecordingBackend(tiny_checkpoint, CPU, max_batch=3)


@pytest.fixture(scope="module")
def engine(backend):
    """One engine for the module's tests: each test leaves it idle (running_count 0)."""
    with running_engine(backend, max_batch=3, max_waiting=8) as engine:
        yield engine


def ids_of(backend, req) -> list[int]:
    return backend.tokens[req.request_id]


class GatedSink(RecordingSink):
    """Pauses the engine thread inside its first ``TextDelta`` until the test opens the gate, so the
    test can act at a known point of a request (between two steps)."""

    def __init__(self):
        super().__init__()
        self.reached = threading.Event()
        self.gate = threading.Event()

    def put(self, event):
        super().put(event)
        if isinstance(event, TextDelta) and not self.reached.is_set():
            self.reached.set()
            if not self.gate.wait(30):
                raise TimeoutError("the test never opened the gate")


def test_golden_greedy_tokens(tmp_path, tokenizer_path):
    write_checkpoint(tmp_path, random_model(tiny_config(), seed=3, std=0.3), tokenizer_path)
    backend = RecordingBackend(tmp_path, CPU, max_batch=1)
    with running_engine(backend, max_batch=1) as engine:
        req = request(GOLDEN_PROMPT, max_tokens=len(GOLDEN_TOKENS), ignore_eos=True)
        sink = RecordingSink()
        engine.submit(req, sink)
        finished = sink.wait()
    assert ids_of(backend, req) == GOLDEN_TOKENS
    assert (finished.reason, finished.prompt_tokens, finished.completion_tokens) == ("length", 5, 16)


def test_batched_requests_of_different_lengths_match_running_alone(engine, backend):
    prompts = [[1, 5], [1] + list(range(40, 60)), [1, 7, 8, 9], list(range(100, 133)), [1, 300], [2, 3, 4, 5, 6]]
    max_tokens = [12, 5, 20, 8, 15, 3]  # rows leave at different steps; waiting ones take their place
    alone = []
    for prompt, n in zip(prompts, max_tokens):
        req = request(prompt, max_tokens=n, ignore_eos=True)
        generate_req(engine, req)
        alone.append(ids_of(backend, req))
    together = [request(p, max_tokens=n, ignore_eos=True) for p, n in zip(prompts, max_tokens)]
    sinks = [RecordingSink() for _ in together]
    for req, sink in zip(together, sinks):
        engine.submit(req, sink)  # 6 requests, 3 rows: continuous admission as rows free up
    for sink, n in zip(sinks, max_tokens):
        finished = sink.wait()
        assert finished.reason == "length" and finished.completion_tokens == n
    assert [ids_of(backend, r) for r in together] == alone
    assert engine.running_count == 0 and engine.waiting_count == 0


def generate_req(engine, req) -> RecordingSink:
    sink = RecordingSink()
    engine.submit(req, sink)
    sink.wait()
    return sink


def test_seeds_same_text_alone_or_batched_different_seeds_differ(engine):
    sampling = dict(temperature=1.0, top_p=0.9, max_tokens=20, ignore_eos=True)
    first = generate(engine, [1, 50, 60], seed=11, **sampling).text
    assert generate(engine, [1, 50, 60], seed=11, **sampling).text == first
    # The same seed in a busy batch, next to unseeded requests.
    sinks = [RecordingSink() for _ in range(3)]
    engine.submit(request([1, 50, 60], seed=11, **sampling), sinks[0])
    for sink in sinks[1:]:
        engine.submit(request([1, 9], **sampling), sink)
    for sink in sinks:
        sink.wait()
    assert sinks[0].text == first
    assert generate(engine, [1, 50, 60], seed=12, **sampling).text != first


def test_stop_string_ends_the_stream_before_it(engine, backend):
    full = generate(engine, [1, 42], max_tokens=30, ignore_eos=True)
    text = full.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    assert stop.strip(), f"pick another prompt: no usable stop string in {text!r}"
    sink = generate(engine, [1, 42], max_tokens=30, ignore_eos=True, stop=(stop, "never-in-output"))
    assert sink.finished.reason == "stop"
    assert sink.text == text[:text.find(stop)]


def test_abort_frees_the_slot_for_the_next_request(tiny_checkpoint):
    with running_engine(RecordingBackend(tiny_checkpoint, CPU, max_batch=1), max_batch=1) as engine:
        long = GatedSink()
        ticket = engine.submit(request([1, 2], max_tokens=100, ignore_eos=True), long)
        assert long.reached.wait(30)
        queued = RecordingSink()
        engine.submit(request([1, 3], max_tokens=4, ignore_eos=True), queued)
        engine.abort(ticket)
        long.gate.set()
        assert long.wait().reason == "cancelled" and long.finished.error is None
        assert queued.wait().reason == "length"  # it got the only row
        assert engine.running_count == 0 and engine.waiting_count == 0
        engine.abort(ticket)  # a second abort after the end is harmless


def test_deadline_ends_a_running_request_with_timeout(engine):
    sink = GatedSink()
    req = request([1, 2], max_tokens=100, ignore_eos=True)
    engine.submit(req, sink)
    assert sink.reached.wait(30)
    req.deadline = time.monotonic()  # the time limit passes while the engine is inside a step
    sink.gate.set()
    finished = sink.wait()
    assert finished.reason == "timeout" and isinstance(finished.error, RequestTimeout)
    assert 1 <= finished.completion_tokens < 100
    wait_for(lambda: engine.running_count == 0, what="the slot to be freed")


def test_a_request_past_its_deadline_before_it_runs_times_out(engine):
    sink = RecordingSink()
    engine.submit(request([1, 2], deadline_s=-1.0), sink)
    assert sink.wait().reason == "timeout" and sink.deltas == []


def test_max_waiting_bound_raises_queue_full(tiny_checkpoint):
    with running_engine(RecordingBackend(tiny_checkpoint, CPU, max_batch=1), max_batch=1, max_waiting=1) as engine:
        first = GatedSink()
        engine.submit(request([1, 2], max_tokens=3), first)
        assert first.reached.wait(30)
        engine.submit(request([1, 2], max_tokens=3), RecordingSink())
        with pytest.raises(QueueFull):
            engine.submit(request([1, 2], max_tokens=3), RecordingSink())
        first.gate.set()


def test_a_bad_prompt_fails_only_its_own_request(engine, backend):
    good = [request([1, 30, 31], max_tokens=10, ignore_eos=True) for _ in range(2)]
    bad = request(list(range(1, 129)), max_tokens=1)  # the whole context: no room to generate
    sinks = [RecordingSink() for _ in range(3)]
    for req, sink in zip([good[0], bad, good[1]], sinks):
        engine.submit(req, sink)
    finished = [s.wait() for s in sinks]
    assert finished[1].reason == "error" and isinstance(finished[1].error, ContextLengthExceeded)
    assert finished[0].reason == finished[2].reason == "length"
    assert ids_of(backend, good[0]) == ids_of(backend, good[1])
    assert engine.ready


def test_nan_logits_in_one_row_fail_only_that_request(tiny_checkpoint):
    backend = RecordingBackend(tiny_checkpoint, CPU, max_batch=3)
    with running_engine(backend, max_batch=3) as engine:
        reference = request([1, 70, 71], max_tokens=8, ignore_eos=True)
        generate_req(engine, reference)
        victim = request([1, 5, 6], max_tokens=8, ignore_eos=True)
        runner = backend.runner
        original = runner._forward  # every decode step's pass, whichever kernels serve it

        def forward_poisoning_the_victim(*args, **kwargs):
            logits, chunk_logits = original(*args, **kwargs)
            for row, seq in enumerate(runner.rows):
                if seq.request is victim and len(seq.output_ids) == 3:
                    logits[row] = float("nan")
            return logits, chunk_logits

        runner._forward = forward_poisoning_the_victim
        others = [request([1, 70, 71], max_tokens=8, ignore_eos=True) for _ in range(2)]
        sinks = [RecordingSink() for _ in range(3)]
        for req, sink in zip([others[0], victim, others[1]], sinks):
            engine.submit(req, sink)
        finished = [s.wait() for s in sinks]
        assert finished[1].reason == "error" and isinstance(finished[1].error, ModelError)
        assert finished[1].completion_tokens == 3
        assert [ids_of(backend, r) for r in others] == [ids_of(backend, reference)] * 2
        assert engine.ready and engine.running_count == 0


def test_an_engine_wide_failure_fails_everything_and_marks_the_engine_dead(tiny_checkpoint):
    backend = RecordingBackend(tiny_checkpoint, CPU, max_batch=2)
    with running_engine(backend, max_batch=2) as engine:
        sinks = [GatedSink(), RecordingSink(), RecordingSink()]
        for sink in sinks:
            engine.submit(request([1, 2], max_tokens=50, ignore_eos=True), sink)
        assert sinks[0].reached.wait(30)  # two running, one waiting

        def device_lost(*args, **kwargs):
            raise RuntimeError("CUDA error: device lost")

        backend.runner._forward = device_lost
        sinks[0].gate.set()
        for sink in sinks:
            finished = sink.wait()
            assert finished.reason == "error" and isinstance(finished.error, ModelError)
            assert "device lost" in finished.error.message
        wait_for(lambda: engine.state == "dead", what="the engine to be marked dead")
        assert not engine.ready and "device lost" in engine.error
        with pytest.raises(EngineUnavailable, match="device lost"):
            engine.submit(request([1, 2]), RecordingSink())
    assert backend.runner is None  # closed


@pytest.mark.parametrize("penalty", [{"repetition_penalty": 1.5}, {"frequency_penalty": 1.5},
                                     {"presence_penalty": 1.5}], ids=lambda p: next(iter(p)))
def test_greedy_with_a_penalty_takes_the_best_penalised_token_at_every_step(tmp_path, tokenizer_path, penalty):
    """Batched beside an unpenalised request, each step's token is the argmax of the full forward pass's
    logits after the penalty over everything before it (prompt and output so far)."""
    model = random_model(tiny_config(), seed=3, std=0.3)
    write_checkpoint(tmp_path, model, tokenizer_path)
    backend = RecordingBackend(tmp_path, CPU, max_batch=2)
    with running_engine(backend, max_batch=2) as engine:
        penalised, plain = (request(GOLDEN_PROMPT, max_tokens=16, ignore_eos=True, **penalty),
                            request(GOLDEN_PROMPT, max_tokens=16, ignore_eos=True))
        sinks = [RecordingSink(), RecordingSink()]
        engine.submit(penalised, sinks[0])
        engine.submit(plain, sinks[1])
        for sink in sinks:
            sink.wait()
    out = ids_of(backend, penalised)
    assert ids_of(backend, plain) == GOLDEN_TOKENS  # the neighbour is untouched
    assert out != GOLDEN_TOKENS  # the penalty changed the text
    params = SamplingParams(**penalty)
    with torch.inference_mode():
        for step, token in enumerate(out):
            logits = model(torch.tensor([GOLDEN_PROMPT + out[:step]]))[0, -1:]  # [1, V]
            scores = apply_penalties(logits, [params], [(GOLDEN_PROMPT, out[:step])])[0]
            assert scores[token] >= scores.max() - 1e-4, f"step {step}"



def test_every_generated_token_gets_its_logprob_once_in_order(engine, backend, tiny_checkpoint):
    """Held-back text (byte-fallback pieces, a possible stop string) delays a token's logprob to a later
    delta, never drops or repeats it; each is the log-softmax of the full forward pass's logits."""
    from models.checkpoint import load_model

    req = request([1, 50, 60, 70], max_tokens=24, ignore_eos=True, temperature=1.0, seed=5, logprobs=3)
    sink = RecordingSink()
    engine.submit(req, sink)
    finished = sink.wait()
    entries = [e for event in sink.events if isinstance(event, TextDelta) for e in event.logprobs]
    out = ids_of(backend, req)
    assert [e.token for e in entries] == out and finished.completion_tokens == len(out) == 24
    # This seed's text has multi-byte characters spread over byte-fallback tokens: some deltas carry
    # the logprobs of several tokens (the held-back ones), so the delay path is exercised.
    assert max(len(event.logprobs) for event in sink.events if isinstance(event, TextDelta)) > 1
    model = load_model(tiny_checkpoint, CPU)
    with torch.inference_mode():
        logits = model(torch.tensor([req.prompt_ids + out]))[0, len(req.prompt_ids) - 1:-1]  # [24, V]
    expected = torch.log_softmax(logits, -1)
    for step, entry in enumerate(entries):
        assert entry.logprob == pytest.approx(expected[step, entry.token].item(), abs=1e-4)
        assert len(entry.top) == 3 and entry.top[0][1] == pytest.approx(expected[step].max().item(), abs=1e-4)


def test_a_long_prompt_is_prefilled_in_chunks_while_the_others_keep_decoding(tiny_checkpoint):
    long_prompt = [1] + [(7 * i) % 390 + 5 for i in range(100)]  # 101 tokens: 7 chunks of 16
    alone_backend = RecordingBackend(tiny_checkpoint, CPU, max_batch=2, prefill_chunk_tokens=0)
    with running_engine(alone_backend, max_batch=2) as engine:  # one pass, the reference
        reference = request(long_prompt, max_tokens=6, ignore_eos=True)
        generate_req(engine, reference)
    backend = RecordingBackend(tiny_checkpoint, CPU, max_batch=2, prefill_chunk_tokens=16)
    with running_engine(backend, max_batch=2) as engine:
        events = []  # (which request, event), in the order the engine thread produced them

        class Tagged(RecordingSink):
            def __init__(self, tag):
                super().__init__()
                self.tag = tag

            def put(self, event):
                events.append((self.tag, event))
                super().put(event)

        short_sink, long_sink = Tagged("short"), Tagged("long")
        engine.submit(request([1, 5, 6], max_tokens=40, ignore_eos=True), short_sink)
        while not events:
            time.sleep(0.001)
        chunked = request(long_prompt, max_tokens=6, ignore_eos=True)
        engine.submit(chunked, long_sink)
        assert long_sink.wait().reason == "length" and short_sink.wait().reason == "length"
    assert ids_of(backend, chunked) == ids_of(alone_backend, reference)  # the same tokens as one pass
    # The short request kept getting tokens while the long prompt went in, one chunk a step (7 chunks).
    first_long = next(i for i, (tag, _) in enumerate(events) if tag == "long")
    short_tokens = [e.completion_tokens for tag, e in events[:first_long] if tag == "short"]
    assert short_tokens and short_tokens[-1] >= 7


class ChunkSizes(RecordingBackend):
    """The real backend, noting each chunk's size and the rows decoding beside it."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.chunks: list[tuple[int, int]] = []  # (decoding rows, chunk tokens)

    def _chunk_tokens(self, seq, decoding_rows):
        tokens = super()._chunk_tokens(seq, decoding_rows)
        self.chunks.append((decoding_rows, tokens))
        return tokens


def test_a_chunk_is_sized_by_the_budget_while_rows_decode_and_is_the_largest_when_none_do(tiny_checkpoint):
    long_prompt = [1] + [(7 * i) % 390 + 5 for i in range(100)]  # 101 tokens
    backend = ChunkSizes(tiny_checkpoint, CPU, max_batch=2, prefill_chunk_tokens=64)
    with running_engine(backend, max_batch=2) as engine:
        generate_req(engine, request(long_prompt, max_tokens=2, ignore_eos=True))  # nothing else running
        assert backend.chunks == [(0, 64), (0, 37)]
        backend.chunks.clear()
        short = request([1, 5, 6], max_tokens=60, ignore_eos=True)
        short_sink = RecordingSink()
        engine.submit(short, short_sink)
        while not backend.tokens.get(short.request_id):
            time.sleep(0.001)
        generate_req(engine, request(long_prompt, max_tokens=2, ignore_eos=True))
        short_sink.wait()
    sizes = [tokens for rows, tokens in backend.chunks]
    assert all(rows == 1 for rows, _ in backend.chunks) and sum(sizes) == len(long_prompt)
    # One decoding row: the first chunk is the budget's guess (3/4 of a row's worth, at least 16), not 64,
    # and each later one at most twice the one before.
    assert sizes[0] == 16 and len(sizes) >= 3
    assert all(later <= 2 * earlier for earlier, later in zip(sizes, sizes[1:]))

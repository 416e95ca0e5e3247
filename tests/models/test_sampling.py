"""Sampling per row (temperature, top-k, top-p, seeds) and a sequence's finish reasons."""
from __future__ import annotations

import math
import time

import pytest
import torch

from models.api import GenerationRequest, SamplingParams
from models.errors import ModelError
from models.sampling import apply_penalties, draw, filter_logits, make_generator, sample, token_logprobs
from models.sequence import Sequence

LOGITS = torch.log(torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]))  # probabilities, most likely first


def kept(params: SamplingParams, logits: torch.Tensor = LOGITS) -> list[int]:
    filtered = filter_logits(logits.unsqueeze(0), [params])[0]
    return torch.nonzero(torch.isfinite(filtered)).flatten().tolist()


@pytest.mark.parametrize("top_k, expected", [(-1, [0, 1, 2, 3, 4]), (0, [0, 1, 2, 3, 4]), (2, [0, 1]),
                                             (5, [0, 1, 2, 3, 4]), (50, [0, 1, 2, 3, 4])])
def test_top_k(top_k, expected):
    assert kept(SamplingParams(top_k=top_k)) == expected


@pytest.mark.parametrize("top_p, expected", [(1.0, [0, 1, 2, 3, 4]), (0.5, [0]), (0.6, [0, 1]),
                                             (0.75, [0, 1]), (0.8, [0, 1, 2]), (0.0, [0])])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    assert kept(SamplingParams(top_p=top_p)) == expected


def test_top_p_applies_after_top_k_renormalises():
    # After top-k 2 the probabilities are 2/3 and 1/3: top-p 0.6 keeps only the first.
    assert kept(SamplingParams(top_k=2, top_p=0.6)) == [0]


def test_rows_are_filtered_with_their_own_parameters():
    logits = LOGITS.repeat(3, 1)
    filtered = filter_logits(logits, [SamplingParams(top_k=1), SamplingParams(top_p=0.8), SamplingParams()])
    assert torch.isfinite(filtered).sum(-1).tolist() == [1, 3, 5]


def test_temperature_scales_and_tiny_temperatures_stay_finite():
    probs = filter_logits(LOGITS.unsqueeze(0), [SamplingParams(temperature=2.0)]).softmax(-1)[0]
    expected = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03]).sqrt()
    torch.testing.assert_close(probs, expected / expected.sum())
    sharp = filter_logits(LOGITS.unsqueeze(0), [SamplingParams(temperature=1e-30)]).softmax(-1)[0]
    assert sharp.tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]


def test_sampling_follows_the_distribution():
    params = SamplingParams(temperature=1.0, seed=0)
    generator = make_generator(params, torch.device("cpu"))
    draws = [sample(LOGITS.unsqueeze(0), [params], [generator])[0] for _ in range(2000)]
    share = draws.count(0) / len(draws)
    assert math.isclose(share, 0.5, abs_tol=0.05)
    assert set(draws) == {0, 1, 2, 3, 4}


def test_zero_probability_tokens_are_never_drawn():
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0]]).repeat(200, 1)
    generators = [torch.Generator().manual_seed(i) for i in range(200)]
    assert set(draw(probs, generators)) == {1, 3}
    assert draw(torch.tensor([[0.0, 0.0, 1.0]]), [torch.Generator().manual_seed(0)]) == [2]


def draws(seed: int | None, n: int = 30) -> list[int]:
    params = SamplingParams(temperature=1.0, seed=seed)
    generator = make_generator(params, torch.device("cpu"))
    logits = torch.zeros(1, 1000)  # uniform: every draw is the generator's choice
    return [sample(logits, [params], [generator])[0] for _ in range(n)]


def test_same_seed_same_tokens_different_seeds_differ():
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)
    assert draws(None) != draws(None)


def test_greedy_rows_need_no_generator_and_take_the_argmax():
    params = SamplingParams(temperature=0.0)
    assert make_generator(params, torch.device("cpu")) is None
    assert sample(LOGITS.flip(0).unsqueeze(0), [params], [None]) == [4]
    assert SamplingParams(temperature=0.7, top_k=1).greedy


def test_a_row_with_nan_logits_fails_alone():
    logits = LOGITS.repeat(3, 1)
    logits[1, 2] = float("nan")
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.0, seed=1), SamplingParams(temperature=0.0)]
    out = sample(logits, params, [None, make_generator(params[1], torch.device("cpu")), None])
    assert out[0] == 0 and out[2] == 0
    assert isinstance(out[1], ModelError)


# --- Sequence: what a sampled token means for the stream ---------------------------------------

def seq(tokenizer, prompt_len: int = 3, max_length: int = 100, **sampling) -> Sequence:
    sampling.setdefault("temperature", 0.0)
    req = GenerationRequest("r", [1] * prompt_len, SamplingParams(**sampling), time.monotonic() + 60)
    return Sequence(req, tokenizer, frozenset({2}), max_length)


def feed(sequence: Sequence, ids: list[int]) -> tuple[str, str | None, int]:
    """-> (text sent, finish reason, tokens taken)."""
    text, reason = "", None
    for n, token in enumerate(ids, 1):
        delta, reason = sequence.append(token)
        text += delta
        if reason:
            return text, reason, n
    return text, reason, len(ids)


def test_eos_stops_and_is_not_text(tokenizer):
    ids = tokenizer.encode("hello world")
    assert feed(seq(tokenizer), ids + [2, 5, 6]) == ("hello world", "stop", len(ids) + 1)


def test_ignore_eos_goes_on_to_max_tokens(tokenizer):
    ids = tokenizer.encode("hello") + [2] + tokenizer.encode("world")  # "▁world": the space is its own
    text, reason, n = feed(seq(tokenizer, ignore_eos=True, max_tokens=len(ids)), ids)
    assert (text, reason, n) == ("hello world", "length", len(ids))


def test_max_tokens_gives_length_and_flushes_held_text(tokenizer):
    ids = tokenizer.encode("abc</")
    text, reason, _ = feed(seq(tokenizer, max_tokens=len(ids), stop=("</end>",)), ids)
    assert (text, reason) == ("abc</", "length")  # the held partial stop is released at the end


def test_the_context_limit_ends_the_stream(tokenizer):
    text, reason, n = feed(seq(tokenizer, prompt_len=5, max_length=8, max_tokens=50), [300] * 10)
    assert reason == "length" and n == 3  # 5 + 3 = the whole context


def test_stop_string_across_tokens_is_never_streamed(tokenizer):
    ids = tokenizer.encode("The end. Then more text")
    sequence = seq(tokenizer, stop=("end.",))
    deltas, reason = [], None
    for token in ids:
        delta, reason = sequence.append(token)
        deltas.append(delta)
        if reason:
            break
    assert reason == "stop"
    assert "".join(deltas) == "The "  # not a character of "end." or of what follows


def test_an_incomplete_character_at_eos_is_flushed(tokenizer):
    emoji = tokenizer.encode("😀")[-4:]
    text, reason, _ = feed(seq(tokenizer), emoji[:2] + [2])
    assert reason == "stop" and text == "\ufffd\ufffd"


# --- presence, frequency and repetition penalties -------------------------------------------------

def test_penalties_follow_vllms_semantics():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -2.0]])
    history = ([0], [3, 3, 1])  # the prompt holds 0; the output 3 twice and 1 once
    def penalised(**penalty):
        return apply_penalties(logits, [SamplingParams(**penalty)], [history])[0].tolist()
    # Repetition: prompt and output tokens, positive logits divided, negative ones multiplied.
    assert penalised(repetition_penalty=2.0) == [1.0, -2.0, 0.5, 1.5, -2.0]
    # Frequency: output tokens, once per time generated. Presence: output tokens, once.
    assert penalised(frequency_penalty=0.5) == [2.0, -1.5, 0.5, 2.0, -2.0]
    assert penalised(presence_penalty=0.5) == [2.0, -1.5, 0.5, 2.5, -2.0]
    assert penalised(presence_penalty=-1.0) == [2.0, 0.0, 0.5, 4.0, -2.0]  # negative values encourage


def test_only_penalised_rows_change_and_greedy_takes_the_penalised_best():
    logits = torch.tensor([[2.0, 1.9], [2.0, 1.9]])
    params = [SamplingParams(temperature=0, presence_penalty=1.0), SamplingParams(temperature=0)]
    assert sample(logits, params, [None, None], [([], [0]), None]) == [1, 0]
    assert apply_penalties(logits, [SamplingParams(), SamplingParams()], [None, None]) is logits


def test_token_logprobs_are_the_raw_distributions_for_the_rows_that_ask():
    logits = torch.stack([LOGITS, LOGITS.flip(0), LOGITS])  # rows 0 and 2 are the module's distribution
    params = [SamplingParams(logprobs=2, temperature=0.5), SamplingParams(), SamplingParams(logprobs=0)]
    out = token_logprobs(logits, params, [1, 0, ModelError("bad row")])
    assert out[1] is None and out[2] is None  # not asked; failed
    assert out[0].token == 1 and out[0].logprob == pytest.approx(math.log(0.25), abs=1e-6)  # temperature aside
    assert [t for t, _ in out[0].top] == [0, 1]
    assert [lp for _, lp in out[0].top] == pytest.approx([math.log(0.5), math.log(0.25)], abs=1e-6)
    zero = token_logprobs(LOGITS.unsqueeze(0), [SamplingParams(logprobs=0)], [4])[0]
    assert zero.top == () and zero.logprob == pytest.approx(math.log(0.03), abs=1e-6)

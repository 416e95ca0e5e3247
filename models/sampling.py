"""Turning a batch of logits into next tokens, each row with its own sampling parameters.

Filtering (temperature, top-k, top-p) is done for the whole batch at once; only the final draw is per
row, because each request has its own ``torch.Generator`` (the same seed gives the same text whatever
else shares the batch).
"""
from __future__ import annotations

import torch

from models.api import SamplingParams, TokenLogprob
from models.errors import ModelError


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    """A per-request RNG; greedy requests need none."""
    if params.greedy:
        return None
    generator = torch.Generator(device=device)
    if params.seed is None:
        generator.seed()  # fresh entropy: unseeded requests differ from each other
    else:
        generator.manual_seed(params.seed)
    return generator


def _top_k_width(top_k: int, vocab: int) -> int:
    """How many tokens top-k keeps; -1 (or 0, or more than the vocabulary) keeps them all."""
    return top_k if 0 < top_k < vocab else vocab


def filter_logits(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, then top-k, then top-p (HF's order) for every row. logits [B, V] -> fp32 [B, V].

    Filtered-out tokens get -inf. Subtracting each row's maximum before dividing by the temperature
    keeps tiny temperatures finite (the best token stays at 0, the rest go towards -inf).
    """
    logits = logits.float()
    batch, vocab = logits.shape
    if any(p.temperature != 1.0 for p in params):
        temperature = torch.tensor([p.temperature for p in params], device=logits.device)
        logits = (logits - logits.max(-1, keepdim=True).values) / temperature.unsqueeze(1)
    widths = [_top_k_width(p.top_k, vocab) for p in params]
    if all(w == vocab for w in widths) and all(p.top_p >= 1.0 for p in params):
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
    ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)  # [1, V]
    top_k = torch.tensor(widths, device=logits.device).unsqueeze(1)  # [B, 1]
    sorted_logits = sorted_logits.masked_fill(ranks >= top_k, float("-inf"))
    # top-p over what top-k kept: drop a token once the tokens ranked before it reach top_p.
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    top_p = torch.tensor([p.top_p for p in params], device=logits.device).unsqueeze(1)  # [B, 1]
    drop = mass_before >= top_p
    drop[:, 0] = False  # the most likely token always stays, even with top_p = 0
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(-1, order, sorted_logits)


def apply_penalties(logits: torch.Tensor, params: list[SamplingParams],
                    histories: list[tuple[list[int], list[int]] | None]) -> torch.Tensor:
    """Presence, frequency and repetition penalties (vLLM's semantics) for the rows that ask for them.

    logits [B, V]; ``histories[b]`` is row b's (prompt ids, output ids), needed only where
    ``params[b].penalised``. Presence and frequency count the output only; repetition sees prompt and
    output. -> fp32 [B, V] (the input itself when no row is penalised).
    """
    rows = [row for row, p in enumerate(params) if p.penalised]
    if not rows:
        return logits
    logits = logits.float().clone()
    vocab = logits.shape[-1]
    for row in rows:
        prompt_ids, output_ids = histories[row]
        p = params[row]
        counts = torch.bincount(torch.tensor(output_ids, dtype=torch.long), minlength=vocab)[:vocab]
        counts = counts.to(device=logits.device, dtype=logits.dtype)  # [V]
        if p.repetition_penalty != 1.0:
            seen = counts > 0
            seen[torch.tensor(prompt_ids, dtype=torch.long, device=logits.device).clamp_(max=vocab - 1)] = True
            values = logits[row]
            penalised = torch.where(values > 0, values / p.repetition_penalty, values * p.repetition_penalty)
            logits[row] = torch.where(seen, penalised, values)
        if p.frequency_penalty != 0.0:
            logits[row] -= p.frequency_penalty * counts
        if p.presence_penalty != 0.0:
            logits[row] -= p.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def draw(probs: torch.Tensor, generators: list[torch.Generator | None]) -> list[int]:
    """One token per row of ``probs`` [B, V] by inverse transform sampling.

    Each row takes a single uniform number from its own generator; the search through the cumulative
    distribution is batched. (``torch.multinomial`` per row draws V exponentials per token, which cost
    more than the decode step's attention at batch 64.)
    """
    uniforms = torch.cat([torch.rand(1, generator=g, device=probs.device) for g in generators])  # [B]
    cdf = probs.cumsum(-1)  # [B, V]
    targets = uniforms.unsqueeze(1) * cdf[:, -1:]  # scaled by the total: rounding never runs off the end
    # The first token whose cumulative probability passes the target; zero-probability tokens never are.
    tokens = torch.searchsorted(cdf, targets, right=True).squeeze(1)
    return tokens.clamp_(max=probs.shape[-1] - 1).tolist()


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
           histories: list[tuple[list[int], list[int]] | None] | None = None) -> list[int | ModelError]:
    """logits [B, V] -> one token id per row. ``histories``: see ``apply_penalties`` (needed only
    when a row is penalised).

    A row that cannot be sampled (non-finite logits) gets a ``ModelError`` instead of a token, so one
    request's failure ends that request only.
    """
    # A row's sum is finite exactly when all its logits are (NaN and inf propagate): one cheap pass,
    # where isfinite(logits).all(-1) costs several.
    finite_rows = torch.isfinite(logits.sum(-1, dtype=torch.float32))
    if histories is not None:
        logits = apply_penalties(logits, params, histories)
    # Greedy rows, all at once, read back with the finite flags in one transfer (one device sync).
    greedy_and_finite = torch.stack((torch.argmax(logits, dim=-1), finite_rows.long())).tolist()
    results: list[int | ModelError] = greedy_and_finite[0]
    finite = greedy_and_finite[1]
    random_rows = [row for row, p in enumerate(params) if not p.greedy and finite[row]]
    if random_rows:
        chosen = logits if len(random_rows) == len(params) else logits[random_rows]
        probs = filter_logits(chosen, [params[row] for row in random_rows]).softmax(-1)
        for row, token in zip(random_rows, draw(probs, [generators[row] for row in random_rows])):
            results[row] = token
    for row, ok in enumerate(finite):
        if not ok:
            results[row] = ModelError("the model produced non-finite logits (NaN or infinity)")
    return results


def token_logprobs(logits: torch.Tensor, params: list[SamplingParams],
                   tokens: list[int | ModelError]) -> list[TokenLogprob | None]:
    """For the rows that asked for logprobs: the sampled token's log-probability under the model's own
    distribution (``log_softmax`` of the raw logits) and the ``params.logprobs`` most likely tokens."""
    rows = [row for row, p in enumerate(params) if p.logprobs is not None and isinstance(tokens[row], int)]
    results: list[TokenLogprob | None] = [None] * len(params)
    if not rows:
        return results
    logprobs = torch.log_softmax(logits[rows].float(), dim=-1)  # [R, V]
    chosen = logprobs.gather(1, torch.tensor([[tokens[row]] for row in rows], device=logits.device))
    top_values, top_ids = logprobs.topk(max(params[row].logprobs for row in rows), dim=-1)  # [R, N]
    chosen_list, ids, values = chosen.flatten().tolist(), top_ids.tolist(), top_values.tolist()
    for i, row in enumerate(rows):
        n = params[row].logprobs
        results[row] = TokenLogprob(tokens[row], chosen_list[i], tuple(zip(ids[i][:n], values[i][:n])))
    return results

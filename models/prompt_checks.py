"""The checks every prompt passes, in one place: the web side runs them before submitting (a 400), the
runner again before a prefill (for requests built elsewhere: benchmarks, embedding code)."""
from __future__ import annotations

from models.errors import ContextLengthExceeded, InvalidRequest, RivuletError


def prompt_error(prompt_ids: list[int], context: int, param: str = "prompt") -> RivuletError | None:
    """Why ``prompt_ids`` cannot run in a context of ``context`` tokens (None: it can). A prompt needs
    room for at least one generated token."""
    if not prompt_ids:
        return InvalidRequest("the prompt is empty", param=param)
    if len(prompt_ids) >= context:
        return ContextLengthExceeded(
            f"the prompt is {len(prompt_ids)} tokens; this model's context is {context} tokens, including "
            "at least one generated token", param=param)
    return None

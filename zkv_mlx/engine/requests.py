"""Request validation: what the engine refuses before a request is queued (typed errors that name the fix)."""

from __future__ import annotations

from ..errors import ConfigError, PromptTooLong


def check_prompt(prompt_ids: list[int], vocab: int, max_context: int) -> None:
    """Raises ConfigError for an empty prompt or a token id outside [0, vocab), PromptTooLong when the prompt
    leaves no room for a generated token within `max_context`."""
    if not prompt_ids:
        raise ConfigError("the prompt is empty; pass at least one token of text")
    bad = next((t for t in prompt_ids if not isinstance(t, int) or not 0 <= t < vocab), None)
    if bad is not None:
        raise ConfigError(f"token id {bad!r} is outside the vocabulary (0..{vocab - 1}); pass ids from this "
                          "model's tokenizer")
    if len(prompt_ids) >= max_context:
        raise PromptTooLong(
            f"the prompt has {len(prompt_ids)} tokens but max context is {max_context}; "
            "shorten the prompt or raise --max-context"
        )

"""Postprocessing of sampled tokens: append, check the stop conditions (engine/stop.py), and deliver text deltas
and the final event to the request's listener."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..errors import SamplingError
from . import stop
from .sampler import NO_TOKEN
from .sequence import Sequence


@dataclass(slots=True)
class Event:
    """What a request receives: text deltas (with the token id) and finally done or error."""

    kind: str  # "token" | "done" | "error"
    text: str = ""
    token_id: int | None = None
    finish_reason: str | None = None
    error: Exception | None = None
    usage: dict = field(default_factory=dict)


class Outputs:
    """The listeners of running requests and what each sampled token does to its request.

    Args:
        eos: end-of-sequence token ids. finish: finish(seq, reason) ends a sequence and frees its blocks (the
        scheduler's). register: register(seq) publishes the sequence's newly full blocks to the prefix cache.
    """

    def __init__(self, eos: set[int], finish, register):
        self.eos = eos
        self._end = finish
        self._register = register
        self.listeners: dict[int, callable] = {}

    def postprocess(self, seq: Sequence, token: int) -> None:
        """Appends a sampled token to `seq`, sends the text it releases, and finishes the request if it stops."""
        if seq.t_first is None:
            seq.t_first = time.perf_counter()
        p = seq.params
        if token == NO_TOKEN:  # the model's logits were all NaN / -inf: an error, never a silent EOS
            self.fail(seq, SamplingError(
                f"the model produced no finite logit (all NaN or -inf) after {len(seq.output_ids)} generated "
                "tokens; the weights or the input are broken (check the model file, try --weights-dtype float32)"))
            return
        if stop.is_eos(token, self.eos, p.ignore_eos):
            self.finish(seq, "stop")
            return
        seq.output_ids.append(token)
        self._register(seq)
        seq.detok.add(token)
        text = seq.detok.text
        cut = stop.find_stop(text, seq.emitted, p.stop)
        if cut >= 0:
            self._send_text(seq, text[:cut], token)
            self.finish(seq, "stop", flush=False)
        elif stop.check_length(len(seq.output_ids), seq.num_tokens, p.max_tokens, seq.max_total):
            self.finish(seq, "length", token=token)
        else:
            self._send_text(seq, stop.releasable(text, seq.emitted, p.stop), token)

    def _send_text(self, seq: Sequence, upto: str, token: int | None) -> None:
        delta = upto[seq.emitted:]
        seq.emitted = max(seq.emitted, len(upto))
        self.listeners[seq.seq_id](Event("token", text=delta, token_id=token))

    def finish(self, seq: Sequence, reason: str, flush: bool = True, token: int | None = None) -> None:
        """Ends a request normally: sends the held-back text (unless `flush` is False), then "done"."""
        seq.num_inflight = 0  # a speculative in-flight token past the end is dropped
        if flush:
            seq.detok.flush()
            self._send_text(seq, seq.detok.text, token)
        self._end(seq, reason)
        self.emit_done(seq)

    def emit_done(self, seq: Sequence) -> None:
        """Sends the final "done" event with the request's usage (once)."""
        listener = self.listeners.pop(seq.seq_id, None)
        if listener is None:
            return
        now = time.perf_counter()
        usage = {
            "prompt_tokens": len(seq.prompt_ids),
            "completion_tokens": len(seq.output_ids),
            "cached_tokens": seq.num_cached_tokens,
            "ttft_s": (seq.t_first - seq.t_submit) if seq.t_first else None,
            "total_s": now - seq.t_submit,
        }
        listener(Event("done", finish_reason=seq.finish_reason or "stop", usage=usage))

    def fail(self, seq: Sequence, error: Exception) -> None:
        """Ends one request with `error` (its blocks are freed; other requests go on)."""
        seq.num_inflight = 0
        self._end(seq, "error")
        listener = self.listeners.pop(seq.seq_id, None)
        if listener:
            listener(Event("error", error=error, finish_reason="error"))


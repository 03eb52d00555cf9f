"""`zkv-mlx generate`: answer (chat models) or continue (--raw) a prompt, streaming to stdout."""

from __future__ import annotations

import sys

from ..cli_common import open_model, sampling_kwargs


def run(args) -> int:
    model = open_model(args)
    try:
        tok = model.tokenizer
        # Like mlx-lm's generate: a chat model gets its chat template unless --raw, or unless the prompt already
        # spells out special tokens (then it is taken as written).
        specials = [str(a.content) for a in tok.backend.get_added_tokens_decoder().values() if a.special]
        has_special = any(sp and sp in args.prompt for sp in specials)
        templated = tok.chat_template and not args.raw and not has_special
        run_ = model.chat if templated else model.generate
        for chunk in run_(args.prompt, stream=True, user=args.user, **sampling_kwargs(args)):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
    finally:
        model.close()
    return 0

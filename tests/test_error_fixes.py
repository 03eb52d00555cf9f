"""Errors that propose a fix propose one that works for the rest of the command (issue 17, section 5).

For each bad `zkv-mlx generate` command below: it must fail with a ConfigError whose message suggests a fix; the
suggested flags are parsed out of the message and applied, each alternative on its own ("... or use ..."), and the
result must validate: the CLI's own parser, `make_config` and an `Engine` over a tiny model (pool sizing and
policy checks) all accept it.
"""

import re

import pytest

from zkv_mlx.cli import build_parser, engine_kwargs
from zkv_mlx.config import make_config
from zkv_mlx.engine import Engine
from zkv_mlx.errors import ConfigError
from zkv_mlx.models.loader import load_model

BAD = [
    ["--kv-quant", "int4", "--kv-policy", "window", "--budget", "64"],  # the command
    ["--kv-quant", "int4", "--kv-policy", "h2o", "--budget", "64"],
    ["--kv-quant", "k8v4", "--kv-policy", "window"],
    ["--kv-quant", "int8", "--kv-policy", "h2o", "--budget", "100", "--block-size", "32"],
    ["--kv-quant", "int4", "--kv-policy", "window", "--sinks", "40", "--budget", "64"],
    ["--kv-policy", "h2o", "--budget", "16"],
    ["--kv-policy", "window"],
    ["--kv-policy", "h2o", "--block-size", "128"],
    ["--kv-policy", "h2o", "--block-size", "128", "--budget", "100"],
    ["--kv-policy", "h2o", "--h2o-recent", "64", "--budget", "64"],
    ["--kv-policy", "h2o", "--budget", "100", "--block-size", "20"],
    ["--kv-policy", "window", "--budget", "20", "--block-size", "20"],
    ["--block-size", "20"],
    ["--kv-cache-memory", "1000"],
    ["--kv-cache-memory", "1000", "--block-size", "64"],
]

_ALT = re.compile(r",? or (?=(?:use|pass|drop) --)")
_ACTION = re.compile(r"(drop|use|pass|e\.g\.) (--[a-z0-9-]+)(?: ([^\s,;()]+))?")


def fixes(message: str) -> list[list[tuple[str, str, str | None]]]:
    """The alternatives a message suggests, each a list of (verb, flag, value) actions."""
    out = []
    for alt in _ALT.split(message):
        actions = [(verb, flag, value) for verb, flag, value in _ACTION.findall(alt)
                   if verb == "drop" or value and not value.isupper()]  # TOKENS etc. are placeholders
        if actions:
            out.append(actions)
    return out


def apply(argv: list[str], actions) -> list[str]:
    argv = list(argv)
    for verb, flag, value in actions:
        if flag in argv:
            i = argv.index(flag)
            del argv[i:i + 2]
        if verb != "drop":
            argv += [flag, value]
    return argv


@pytest.fixture(scope="module")
def validate(tiny_model_dir):
    path = str(tiny_model_dir("llama"))
    lm = load_model(path)
    parser = build_parser()

    def check(argv: list[str]) -> None:
        args = parser.parse_args(["generate", "--prompt", "hi", "--ssd-cache", "off", *argv])
        cfg = make_config(model=path, **engine_kwargs(args))
        Engine(lm, cfg)

    return check


@pytest.mark.parametrize("argv", BAD, ids=[" ".join(a) for a in BAD])
def test_every_suggested_fix_validates(argv, validate):
    with pytest.raises(ConfigError) as e:
        validate(argv)
    message = str(e.value)
    alternatives = fixes(message)
    assert alternatives, f"no fix suggested in: {message}"
    for actions in alternatives:
        fixed = apply(argv, actions)
        try:
            validate(fixed)
        except ConfigError as again:
            pytest.fail(f"{argv} -> {message!r}\nsuggested {fixed} -> {again}")


def test_a_quantized_cache_takes_a_policy_and_only_the_budget_is_reported(validate):
    # Issue 19: --kv-quant with --kv-policy was refused ("needs a float KV cache"); now only a budget too small
    # for the quantized format's block size (32 with per-channel keys) is an error, and its fix validates.
    with pytest.raises(ConfigError) as e:
        validate(["--kv-quant", "int4", "--kv-policy", "window", "--budget", "64"])
    assert "too small" in str(e.value) and "float KV cache" not in str(e.value)
    validate(["--kv-quant", "int4", "--kv-policy", "window", "--budget", "128"])
    validate(["--kv-quant", "int8", "--kv-policy", "h2o", "--budget", "512"])


def test_parser_reads_alternatives_and_placeholders():
    msg = "kv_policy h2o needs a float KV cache; drop --kv-quant int4 and pass --budget 512 or use --kv-policy full"
    assert fixes(msg) == [[("drop", "--kv-quant", "int4"), ("pass", "--budget", "512")],
                          [("use", "--kv-policy", "full")]]
    assert fixes("needs a budget: pass --budget TOKENS (e.g. --budget 512)") == [[("e.g.", "--budget", "512")]]

"""The stop checks (engine/stop.py) as pure functions: EOS, max tokens, context limit, stop strings with
hold-back."""

from zkv_mlx.engine import stop


def test_eos_unless_ignored():
    assert stop.is_eos(2, {2, 7}, ignore_eos=False)
    assert not stop.is_eos(2, {2, 7}, ignore_eos=True)
    assert not stop.is_eos(3, {2, 7}, ignore_eos=False)


def test_length_by_max_tokens_and_by_context():
    assert stop.check_length(n_output=4, num_tokens=10, max_tokens=5, max_context=100) is None
    assert stop.check_length(n_output=5, num_tokens=11, max_tokens=5, max_context=100) == "length"
    assert stop.check_length(n_output=1, num_tokens=99, max_tokens=50, max_context=100) is None
    assert stop.check_length(n_output=1, num_tokens=100, max_tokens=50, max_context=100) == "length"


def test_find_stop_earliest_and_across_the_sent_boundary():
    assert stop.find_stop("hello world", 0, ()) == -1
    assert stop.find_stop("hello world", 0, ("world", "lo")) == 3  # the earliest match wins
    # "END" straddles what was sent ("abcE") and what was added ("ND"): still found
    assert stop.find_stop("abcEND", 4, ("END",)) == 3
    # text sent long before is not searched again (it was checked when it was added)
    assert stop.find_stop("END and more text", 15, ("END",)) == -1


def test_hold_back_keeps_a_possible_stop_start_unsent():
    assert stop.hold_back(()) == 0
    assert stop.hold_back(("ab", "xyz")) == 2
    assert stop.releasable("hello", 0, ()) == "hello"
    assert stop.releasable("hello wo", 0, ("world",)) == "hell"  # "o wo" might begin "world"
    # never less than what was already sent
    assert stop.releasable("hello", 4, ("world",)) == "hell"
    assert stop.releasable("hi", 0, ("world",)) == ""

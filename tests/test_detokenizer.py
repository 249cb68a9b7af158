"""Incremental detokenization and stop strings, on the default model's real tokenizer."""
import pytest

from engine.tokenizer import load_tokenizer
from engine.detokenizer import IncrementalDetokenizer, StopStringChecker

TEXTS = [
    "Hello world, how are you today?",
    "  leading spaces and  double  spaces\n\nnew lines\ttabs",
    "Unicode: héllo wörld — 你好世界 🙂🎉 ﬁn",
    "def f(x):\n    return x ** 2  # code",
]


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(None)


def stream(tokenizer, text: str, prompt: str = "Say:") -> list[str]:
    prompt_ids = tokenizer.encode(prompt)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids)
    ids = tokenizer.encode(text)
    return [detok.add([t], finished=i == len(ids) - 1) for i, t in enumerate(ids)]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_the_full_decode(tokenizer, text):
    assert "".join(stream(tokenizer, text)) == text


@pytest.mark.parametrize("text", TEXTS)
def test_no_delta_carries_a_broken_utf8_character(tokenizer, text):
    assert all("\ufffd" not in delta for delta in stream(tokenizer, text))


def test_several_tokens_at_once_equal_one_by_one(tokenizer):
    text = TEXTS[2]
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, [])
    chunks = [ids[i:i + 3] for i in range(0, len(ids), 3)]
    out = [detok.add(c, finished=i == len(chunks) - 1) for i, c in enumerate(chunks)]
    assert "".join(out) == text


def test_special_tokens_are_not_emitted(tokenizer):
    detok = IncrementalDetokenizer(tokenizer, [])
    ids = tokenizer.encode("Done.") + [tokenizer.eos_token_id]
    assert "".join(detok.add([t]) for t in ids) == "Done."


def test_a_split_character_is_released_when_the_stream_ends(tokenizer):
    ids = tokenizer.encode("🙂")
    assert len(ids) > 1
    detok = IncrementalDetokenizer(tokenizer, [])
    assert detok.add(ids[:1]) == ""
    assert detok.add([], finished=True) != ""


def run_stop(stop: list[str], deltas: list[str], include: bool = False):
    checker = StopStringChecker(stop, include)
    out = []
    for i, delta in enumerate(deltas):
        match = checker.add(delta, finished=i == len(deltas) - 1)
        out.append(match.text)
        if match.stopped:
            return out, True
    return out, False


def test_stop_string_inside_one_delta_is_trimmed():
    out, stopped = run_stop(["END"], ["abc END def"])
    assert (out, stopped) == (["abc "], True)


def test_stop_string_split_across_deltas_never_leaks():
    out, stopped = run_stop(["STOP"], ["one S", "T", "O", "P two"])
    assert stopped and "".join(out) == "one "
    assert all("S" not in piece for piece in out)


def test_partial_stop_prefix_is_released_when_it_turns_out_not_to_match():
    out, stopped = run_stop(["STOP"], ["one ST", "ART"])
    assert not stopped and out == ["one ", "START"]


def test_held_back_tail_is_released_at_the_end():
    out, stopped = run_stop(["STOP"], ["a", "b ST"])
    assert not stopped and "".join(out) == "ab ST"


def test_earliest_of_several_stop_strings_wins():
    out, stopped = run_stop(["world", "lo"], ["hello world"])
    assert (out, stopped) == (["hel"], True)


def test_include_stop_str_in_output_keeps_the_stop_string():
    out, stopped = run_stop(["\n"], ["line one", "\nline two"], include=True)
    assert stopped and "".join(out) == "line one\n"


def test_no_stop_strings_release_everything_at_once():
    out, stopped = run_stop([], ["a", "b"])
    assert (out, stopped) == (["a", "b"], False)

"""Incremental text: a token at a time, no character split across pieces, nothing released
that may still turn out to start a stop string; the pieces add up to the whole decode."""

from __future__ import annotations

from tiny import tiny_tokenizer

from mixloom.inference.detokenize import TextStream

TEXT = "héllo 🙂 wörld, and then we stop here"


def _feed(text: str, stop: tuple[str, ...] = ()) -> tuple[list[str], bool, TextStream, list[int]]:
    tok = tiny_tokenizer()
    ids = tok.encode(text, add_special_tokens=False)
    stream = TextStream(tok, tok.encode("prompt: ", add_special_tokens=False), stop)
    pieces, stopped = [], False
    for token in ids:
        piece, stopped = stream.push(token)
        pieces.append(piece)
        if stopped:
            break
    return pieces, stopped, stream, ids


def test_pieces_never_split_a_character_and_add_up() -> None:
    pieces, stopped, stream, ids = _feed(TEXT)
    assert len(ids) > len(TEXT)  # one token a byte: characters of 2 and 4 bytes
    assert not stopped and "".join(pieces) == TEXT == stream.text
    assert not any("\ufffd" in p for p in pieces)
    emoji = TEXT.encode().index("🙂".encode())
    assert pieces[emoji : emoji + 4] == ["", "", "", "🙂"]  # out when its 4th byte came


def test_stop_string_is_held_back_then_cut() -> None:
    pieces, stopped, stream, _ = _feed(TEXT, stop=("stop",))
    assert stopped
    assert "".join(pieces) == stream.text == TEXT[: TEXT.index("stop")]
    assert pieces[-4:-1] == ["", "", ""]  # "s", "t", "o" held: they might start "stop"


def test_a_false_start_is_released_when_it_is_clear() -> None:
    pieces, stopped, stream, _ = _feed("the wx", stop=("wy", "thx"))
    assert not stopped
    assert pieces == ["", "", "the", " ", "", "wx"]  # "t"/"th" could begin "thx", "w" "wy"
    assert stream.flush() == "" and stream.text == "the wx"


def test_flush_releases_what_was_held_and_an_unfinished_character() -> None:
    tok = tiny_tokenizer()
    ids = tok.encode("ok 🙂", add_special_tokens=False)[:-2]  # the emoji's last 2 bytes missing
    stream = TextStream(tok, [], stop=("k 🙂!",))
    released = "".join(stream.push(t)[0] for t in ids)
    assert released == "o"  # "k " might begin the stop string; the emoji is unfinished
    rest = stream.flush()
    assert released + rest == tok.decode(ids) and rest.startswith("k ")

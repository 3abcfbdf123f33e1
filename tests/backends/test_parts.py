"""The decoder's reading of a turn's parts from its tokens: think block, then the branch the grammar took."""

from __future__ import annotations

import pytest

from smolrun.backends.parts import PartReader, Parts, Tag

OPEN, CLOSE, CALL = 300, 301, 302  # special tokens: the think tags and a one-token "<tool_call>"
PIECES = {OPEN: b"<think>", CLOSE: b"</think>", CALL: b"<tool_call>"}
LAYOUT = Parts((OPEN, CLOSE), (Tag("code", b"```python\n"), Tag("calls", b"<tool_call>", CALL)))


def read(tokens: list[int], parts: Parts = LAYOUT, pieces: dict[int, bytes] = PIECES,
         step: int = 1) -> tuple[list[tuple[str, bytes]], int]:
    reader = PartReader(parts, lambda t: pieces.get(t, bytes([t]) if t < 256 else b""))
    out: list[tuple[str, bytes]] = []
    for at in range(0, len(tokens), step):
        segments = reader.read(tokens[at:at + step])
        out += [(s.piece, s.data) for s in segments]
    out += [(s.piece, s.data) for s in reader.flush()]
    merged: list[tuple[str, bytes]] = []
    for piece, data in out:
        if not data:  # tags and dropped blanks: their tokens are counted, their text is no one's
            continue
        if merged and merged[-1][0] == piece:
            merged[-1] = (piece, merged[-1][1] + data)
        else:
            merged.append((piece, data))
    return merged, reader.thought_tokens


def tokens_of(text: bytes) -> list[int]:
    return list(text)


@pytest.mark.parametrize("step", [1, 3, 100])
def test_a_thought_then_a_code_call_told_by_its_bytes(step: int) -> None:
    tokens = [OPEN, *tokens_of(b"plan"), CLOSE, *tokens_of(b"\n\n```python\nprint(1)\n```")]
    assert read(tokens, step=step) == ([("thought", b"plan"), ("code", b"```python\nprint(1)\n```")], 6)


@pytest.mark.parametrize("pieces", [PIECES, {}])  # the tags' pieces as text, or rendered as nothing
def test_special_tokens_tell_the_parts_even_when_their_pieces_are_empty(pieces: dict[int, bytes]) -> None:
    tokens = [OPEN, *tokens_of(b"call f"), CLOSE, *tokens_of(b"\n"), CALL, *tokens_of(b'{"name":"f"}')]
    call = pieces.get(CALL, b"")
    assert read(tokens, pieces=pieces) == ([("thought", b"call f"), ("calls", call + b'{"name":"f"}')], 8)


def test_free_text_is_known_at_its_first_byte_that_starts_no_tag() -> None:
    parts = Parts(None, (Tag("code", b"<code>"), Tag("calls", b"<tool_call>")))
    assert read(tokens_of(b"Hello"), parts) == ([("text", b"Hello")], 0)
    assert read(tokens_of(b"<code>x</code>"), parts) == ([("code", b"<code>x</code>")], 0)
    assert read(tokens_of(b"<tool_call>{}"), parts) == ([("calls", b"<tool_call>{}")], 0)
    assert read(tokens_of(b"<to"), parts) == ([("text", b"<to")], 0)  # cut while it could be either: text


def test_a_turn_without_branches_is_text_from_the_first_token_and_a_cut_thought_is_all_thought() -> None:
    assert read(tokens_of(b"  <hi>"), Parts()) == ([("text", b"  <hi>")], 0)  # blanks kept: no think block
    assert read([OPEN, *tokens_of(b"still thinking")], LAYOUT) == ([("thought", b"still thinking")], 15)
    assert read([OPEN, CLOSE, *tokens_of(b" \n Hi")], Parts((OPEN, CLOSE))) == ([("text", b"Hi")], 2)

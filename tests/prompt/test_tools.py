"""Reading a turn of function calls by the structure the grammar gave it (tags around compact JSON)."""

import pytest

from smolrun.prompt.tools import Calls, read_calls


def shown(text: str, ids: tuple[str, ...] = ()) -> tuple[list[tuple[str, str]], tuple[str, str] | None]:
    calls = read_calls(text, ids)
    partial = (calls.partial.name, calls.partial.arguments) if calls.partial else None
    return [(c.name, c.arguments) for c in calls.complete], partial


def test_complete_calls_with_the_newlines_the_grammar_allows() -> None:
    text = ('<tool_call>{"name":"f","arguments":{"a":"x</tool_call>y"}}</tool_call>\n'
            '<tool_call>\n{"name":"g","arguments":{}}\n</tool_call>')
    assert shown(text) == ([("f", '{"a":"x</tool_call>y"}'), ("g", "{}")], None)


def test_a_cut_call_keeps_its_name_and_the_arguments_so_far() -> None:
    head = '<tool_call>{"name":"f","arguments":{"a":1}}</tool_call>\n<tool_call>{"name":"g\\"q","arguments":'
    assert shown(head + '{"b":[1,') == ([("f", '{"a":1}')], ('g"q', '{"b":[1,'))
    assert shown(head + '{"b":2}}') == ([("f", '{"a":1}')], ('g"q', '{"b":2}'))  # whole JSON, no closing tag yet
    assert shown(head[:-5]) == ([("f", '{"a":1}')], None)  # its name not yet whole: nothing to say about it


def test_ids_already_announced_are_kept() -> None:
    calls = read_calls('<tool_call>{"name":"f","arguments":{}}</tool_call>\n<tool_call>{"name":"g","arguments":{',
                       ("call_a",))
    assert calls.complete[0].id == "call_a" and calls.partial is not None and calls.partial.id.startswith("call_")


CALLS = ('<tool_call>{"name":"f","arguments":{"a":"x</tool_call>y\\"}","b":[{"c":"]"}]}}</tool_call>\n'
         '<tool_call>\n{"name":"g","arguments":{}}\n</tool_call>\n'
         '<tool_call>{"name":"h","arguments":{"n":12,"s":"\\\\"}}</tool_call>')


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_the_streaming_reader_agrees_with_read_calls_at_every_point(step: int) -> None:
    from smolrun.prompt.tools import CallReader

    reader = CallReader()
    streamed: dict[int, str] = {}
    for at in range(0, len(CALLS), step):
        for p in reader.push(CALLS[at:at + step]):
            assert p.new == (p.index not in streamed)
            streamed[p.index] = streamed.get(p.index, "") + p.arguments
        assert shown_calls(reader.calls) == shown(CALLS[:at + step])  # the same as reading it all again
    assert shown(CALLS) == ([("f", '{"a":"x</tool_call>y\\"}","b":[{"c":"]"}]}'), ("g", "{}"),
                             ("h", '{"n":12,"s":"\\\\"}')], None)
    assert streamed == {0: '{"a":"x</tool_call>y\\"}","b":[{"c":"]"}]}', 1: "{}", 2: '{"n":12,"s":"\\\\"}'}
    assert len({c.id for c in reader.calls.all}) == 3


def shown_calls(calls: Calls) -> tuple[list[tuple[str, str]], tuple[str, str] | None]:
    partial = (calls.partial.name, calls.partial.arguments) if calls.partial else None
    return [(c.name, c.arguments) for c in calls.complete], partial

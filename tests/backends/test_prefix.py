"""Which part of the KV cache a new prompt may keep: the common prefix, never splitting or swapping a picture."""

from __future__ import annotations

from smolrun.backends.base import Pixels, reusable_prefix, reusable_with_pixels


def test_the_common_prefix_leaves_one_token_to_evaluate() -> None:
    assert reusable_prefix([1, 2, 3, 4], [1, 2, 9]) == 2
    assert reusable_prefix([1, 2, 3], [1, 2, 3]) == 2  # all equal: the last token is evaluated again
    assert reusable_prefix([], [5, 6]) == 0


def picture(start: int, end: int, name: bytes) -> Pixels:
    return Pixels(start, end, None, name)


def test_equal_pictures_are_kept_and_changed_ones_redone() -> None:
    held = [picture(2, 10, b"red"), picture(12, 20, b"blue")]
    assert reusable_with_pixels(25, held, [picture(2, 10, b"red"), picture(12, 20, b"blue")]) == 25
    assert reusable_with_pixels(25, held, [picture(2, 10, b"red"), picture(12, 20, b"green")]) == 12
    assert reusable_with_pixels(25, held, [picture(2, 10, b"green"), picture(12, 20, b"blue")]) == 2


def test_a_prefix_never_ends_inside_a_picture() -> None:
    held = [picture(2, 10, b"red")]
    assert reusable_with_pixels(6, held, [picture(2, 10, b"red")]) == 2
    assert reusable_with_pixels(2, held, [picture(2, 10, b"red")]) == 2  # ends before it: nothing to redo
    assert reusable_with_pixels(30, [], [picture(40, 50, b"red")]) == 30  # a new picture after the prefix

"""vdm.sg: cutting and copying over a list of buffers behaves like the one byte string they form."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st
from vdm import sg

pieces = st.lists(st.binary(max_size=40), max_size=8)


def views_of(parts: list[bytes]) -> list[memoryview]:
    return [memoryview(bytearray(p)) for p in parts]


@given(pieces, st.integers(0, 300), st.one_of(st.none(), st.integers(0, 300)))
def test_slice_views_is_a_slice_of_the_whole(parts, offset, length):
    whole = b"".join(parts)
    got = b"".join(bytes(v) for v in sg.slice_views(views_of(parts), offset, length))
    assert got == (whole[offset:] if length is None else whole[offset : offset + length])


@given(pieces, st.integers(0, 300))
def test_advance_drops_the_first_bytes(parts, n):
    assert b"".join(bytes(v) for v in sg.advance(views_of(parts), n)) == b"".join(parts)[n:]


@given(pieces, st.data())
def test_split_views_groups_add_up_and_share_memory(parts, data):
    views = views_of(parts)
    whole = b"".join(parts)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(whole)), max_size=4)))
    lengths = [b - a for a, b in zip([0, *cuts], cuts)]
    groups = list(sg.split_views(views, lengths))
    assert [sg.total_length(g) for g in groups] == lengths
    assert b"".join(bytes(v) for g in groups for v in g) == whole[: sum(lengths)]
    for g in groups:  # no copy: writing a group writes the buffers given
        sg.fill_zero(g)
    assert b"".join(bytes(v) for v in views)[: sum(lengths)] == bytes(sum(lengths))


@given(pieces, st.binary(max_size=300))
def test_scatter_then_gather_round_trips_what_fits(parts, data):
    views = views_of(parts)
    room = sg.total_length(views)
    assert sg.scatter(data, views) == min(len(data), room)
    assert b"".join(bytes(v) for v in views)[: len(data)] == data[:room]
    dest = bytearray(b"\xff" * (room + 3))
    assert sg.gather_into(dest, views, 3) == room
    assert dest[3:] == b"".join(bytes(v) for v in views) and dest[:3] == b"\xff" * 3


def test_gather_into_stops_at_the_end_of_dest():
    dest = bytearray(5)
    assert sg.gather_into(dest, views_of([b"abc", b"defg"]), 2) == 3
    assert dest == b"\0\0abc"


def test_fill_zero_covers_views_larger_than_its_block():
    v = memoryview(bytearray(b"\x01" * ((1 << 16) + 5)))
    sg.fill_zero([v])
    assert not any(v)

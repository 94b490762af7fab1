"""The recorder's flow encoder writes exactly the bytes mitmproxy's reference encoder writes."""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy.io import tnetstring as reference
from mitmproxy.test import tflow

from sluicegate.recording import tnetstring


class Level(enum.IntEnum):
    LOW = 1


class Text(str):
    def __str__(self) -> str:
        return "not what is encoded"


class Pair(tuple):
    pass


scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.binary(max_size=40)
    | st.text(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.lists(inner, max_size=5).map(tuple)
        | st.dictionaries(st.text(max_size=10) | st.binary(max_size=10), inner, max_size=5)
    ),
    max_leaves=40,
)


@given(values)
def test_same_bytes_as_mitmproxy(value: Any) -> None:
    assert tnetstring.dumps(value) == reference.dumps(value)


@given(st.lists(values, min_size=1, max_size=4), st.data())
def test_known_encodings_are_copied_in_exactly(parts: list[Any], data: st.DataObject) -> None:
    document = {"parts": parts, "more": [{"k": p} for p in parts]}
    containers = [p for p in parts if isinstance(p, dict | list | tuple)] + document["more"]
    chosen = data.draw(st.lists(st.sampled_from(containers), unique_by=id) if containers else [])
    known = {id(c): reference.dumps(c) for c in chosen}
    assert tnetstring.dumps(document, known) == reference.dumps(document)


def test_odd_values_follow_the_reference() -> None:
    for value in (
        Level.LOW,
        OrderedDict(b=1, a=[2]),
        {1: 2.5, None: True},
        [Text("abc"), Pair((b"x", Level.LOW)), bytearray(b"no")][:2],
        {Text("k"): Pair(())},
        math.inf,
        -0.0,
        10**40,
        "\u00e9\U0001f600",
        tflow.tflow(resp=True).get_state(),
    ):
        assert tnetstring.dumps(value) == reference.dumps(value)
    for bad in (object(), [1, {2j}], "\ud800"):
        with pytest.raises(Exception) as ours:
            tnetstring.dumps(bad)
        with pytest.raises(Exception) as theirs:
            reference.dumps(bad)
        assert type(ours.value) is type(theirs.value)


@given(values)
def test_loads_reads_what_mitmproxy_reads(value: Any) -> None:
    data = reference.dumps(value)
    assert tnetstring.loads(data) == reference.loads(data)


def test_loads_reads_a_real_flow_and_refuses_garbage() -> None:
    flow = tflow.tflow(resp=True)
    data = reference.dumps(flow.get_state())
    assert tnetstring.loads(data) == reference.loads(data)
    for bad in (b"", b"5:abc,", b"3:abc?", b"x:abc,", b"3:abc,extra", b"4:true!x", b"1:a~"):
        with pytest.raises(tnetstring.TNetStringError):
            tnetstring.loads(bad)

"""The recorder's flow encoder writes exactly the bytes mitmproxy's reference encoder writes."""

from __future__ import annotations

import enum
import math
from collections import OrderedDict
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from mitmproxy import http
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


header_fields = st.lists(
    st.tuples(st.binary(max_size=20), st.binary(max_size=20))
    | st.tuples(st.binary(max_size=5), st.text(max_size=5) | st.integers() | st.none())
    | st.tuples(st.binary(max_size=5)),
    max_size=6,
)


@given(header_fields, st.dictionaries(st.text(max_size=8), values, max_size=6))
def test_header_fields_and_inline_scalars_are_the_reference_bytes(
    fields: list[Any], mapping: dict[str, Any]
) -> None:
    """The fast paths (a pair of byte strings in one step, scalars in their container's loop,
    cached keys) against the reference, including pairs that must not take the fast path."""
    document = {"headers": fields, "trailers": tuple(fields), "meta": mapping, "list": [mapping]}
    assert tnetstring.dumps(document) == reference.dumps(document)
    assert tnetstring.dumps(document) == reference.dumps(document)  # keys now from the cache


def test_key_cache_is_bounded_and_exact_past_its_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tnetstring, "_KEYS", {})
    monkeypatch.setattr(tnetstring, "_KEYS_MAX", 3)
    document = {f"key-{i}-\u00e9": i for i in range(10)}
    assert tnetstring.dumps(document) == reference.dumps(document)
    assert len(tnetstring._KEYS) == 3
    assert tnetstring.dumps(document) == reference.dumps(document)


def test_every_kind_of_recorded_flow_is_the_reference_bytes() -> None:
    """Flow states as the recorder encodes them: HTTP with trailers, errors, websockets."""
    flows = [
        tflow.tflow(resp=True),
        tflow.tflow(err=True),
        tflow.twebsocketflow(),
        tflow.tflow(resp=True, ws=True),
    ]
    with_trailers = tflow.tflow(resp=True)
    with_trailers.request.trailers = http.Headers([(b"x-sum", b"1")])
    with_trailers.response.trailers = http.Headers([(b"x-sum", b"2"), (b"x-sum", b"3")])
    flows.append(with_trailers)
    for flow in flows:
        flow.metadata["sluicegate"] = {"caller": {"groups": ["a"]}, "timings": {"total_ms": 1.5}}
        state = flow.get_state()
        assert tnetstring.dumps(state) == reference.dumps(state)
        conns = {id(state[k]): reference.dumps(state[k]) for k in ("client_conn", "server_conn")}
        assert tnetstring.dumps(state, conns) == reference.dumps(state)


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

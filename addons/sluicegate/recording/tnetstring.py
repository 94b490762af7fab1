"""mitmproxy's flow file encoding (typed netstrings), the same bytes, written faster.

`mitmproxy.io.tnetstring.dumps` is the reference: every record must be byte-for-byte what it
writes, so that stock mitmproxy reads the session files and the chain hashes what was written
(a property test compares the two on arbitrary values). Two things make this one cheaper per
flow: dispatch on the exact type first (subclasses follow the reference's `isinstance` rules),
and `known` encodings: containers whose bytes the caller already has (a connection's state, the
same for every flow of a keep-alive connection) are copied in instead of being encoded again.
No mitmproxy import: the recording package stays usable without it.

Note the reference's order for mappings: it writes the pairs last first (it builds the output
backwards), so this does the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

NO_KNOWN: Mapping[int, bytes] = {}


def dumps(value: Any, known: Mapping[int, bytes] = NO_KNOWN) -> bytes:
    """`value` encoded; `known` maps `id(container)` to that container's encoding."""
    parts: list[bytes] = []
    _encode(value, parts, known)
    return b"".join(parts)


def _encode(value: Any, parts: list[bytes], known: Mapping[int, bytes]) -> int:
    """Append the encoding of `value` to `parts`; its length."""
    kind = type(value)
    if kind is bytes:
        head = b"%d:" % len(value)
        parts += (head, value, b",")
        return len(head) + len(value) + 1
    if kind is str:
        data = value.encode("utf8")
        head = b"%d:" % len(data)
        parts += (head, data, b";")
        return len(head) + len(data) + 1
    if kind is dict or kind is list or kind is tuple:
        done = known.get(id(value)) if known else None
        if done is not None:
            parts.append(done)
            return len(done)
        at = len(parts)
        parts.append(b"")
        size = 0
        if kind is dict:
            for key, item in reversed(value.items()):
                size += _encode(key, parts, known)
                size += _encode(item, parts, known)
            tail = b"}"
        else:
            for item in value:
                size += _encode(item, parts, known)
            tail = b"]"
        head = b"%d:" % size
        parts[at] = head
        parts.append(tail)
        return len(head) + size + 1
    if value is None:
        parts.append(b"0:~")
        return 3
    if value is True:
        parts.append(b"4:true!")
        return 7
    if value is False:
        parts.append(b"5:false!")
        return 8
    if kind is int:
        data = b"%d" % value
    elif kind is float:
        data = repr(value).encode()
    else:
        return _encode_subclass(value, parts, known)
    item = b"%d:%s%s" % (len(data), data, b"#" if kind is int else b"^")
    parts.append(item)
    return len(item)


def _encode_subclass(value: Any, parts: list[bytes], known: Mapping[int, bytes]) -> int:
    """Instances of subclasses (IntEnum, OrderedDict...), by the reference's `isinstance` rules."""
    if isinstance(value, int):
        data, tag = str(value).encode(), b"#"
    elif isinstance(value, float):
        data, tag = repr(value).encode(), b"^"
    elif isinstance(value, bytes | str):
        return _encode(value[:], parts, known)  # a slice of a subclass is the base type
    elif isinstance(value, list | tuple):
        return _encode(list(value), parts, known)
    elif isinstance(value, dict):
        return _encode(dict(value.items()), parts, known)
    else:
        raise ValueError(f"unserializable object: {value} ({type(value)})")
    item = b"%d:%s%s" % (len(data), data, tag)
    parts.append(item)
    return len(item)


class TNetStringError(ValueError):
    """Not a well-formed typed netstring."""


def loads(data: bytes) -> Any:
    """The value encoded in `data` (one whole record), as `mitmproxy.io.tnetstring.loads` reads
    it. Raises TNetStringError on anything malformed or left over."""
    value, end = _pop(data, 0, len(data))
    if end != len(data):
        raise TNetStringError("trailing data after the value")
    return value


def _pop(data: bytes, start: int, stop: int) -> tuple[Any, int]:
    """The value that starts at `start` (and ends by `stop`), and the offset after it."""
    colon = data.find(b":", start, min(stop, start + 12))
    if colon <= start or not data[start:colon].isdigit():
        raise TNetStringError("not a tnetstring: no length prefix")
    end = colon + 1 + int(data[start:colon])
    if end >= stop:
        raise TNetStringError("not a tnetstring: cut short")
    kind, first = data[end], colon + 1
    if kind == 0x2C:  # ,
        return data[first:end], end + 1
    if kind == 0x3B:  # ;
        try:
            return data[first:end].decode("utf8"), end + 1
        except UnicodeDecodeError:
            raise TNetStringError("invalid UTF-8 in a string") from None
    if kind in (0x23, 0x5E):  # # ^
        try:
            number = data[first:end]
            return (int(number) if kind == 0x23 else float(number)), end + 1
        except ValueError:
            raise TNetStringError("not a number") from None
    if kind == 0x21:  # !
        if data[first:end] not in (b"true", b"false"):
            raise TNetStringError("not a boolean")
        return data[first:end] == b"true", end + 1
    if kind == 0x7E:  # ~
        if end != first:
            raise TNetStringError("null with a payload")
        return None, end + 1
    if kind == 0x5D:  # ]
        items: list[Any] = []
        at = first
        while at < end:
            item, at = _pop(data, at, end)
            items.append(item)
        return items, end + 1
    if kind == 0x7D:  # }
        result: dict[Any, Any] = {}
        at = first
        while at < end:
            key, at = _pop(data, at, end)
            if not isinstance(key, (bytes, str)):
                raise TNetStringError("dictionary keys must be strings")
            result[key], at = _pop(data, at, end)
        return result, end + 1
    raise TNetStringError(f"unknown type tag {chr(kind)!r}")

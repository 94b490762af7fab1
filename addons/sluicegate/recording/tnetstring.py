"""mitmproxy's flow file encoding (typed netstrings), the same bytes, written faster.

`mitmproxy.io.tnetstring.dumps` is the reference: every record must be byte-for-byte what it
writes, so that stock mitmproxy reads the session files and the chain hashes what was written (a
property test compares the two on arbitrary values). Three things make this one cheaper per flow:
dispatch on the exact type first (subclasses follow the reference's `isinstance` rules), fewer
Python calls per value (scalars encoded in their container's loop, mapping keys from a cache, a
header field's pair of byte strings in one step), and `known` encodings: containers whose bytes the
caller already has (a connection's state, the same for every flow of a keep-alive connection) are
copied in instead of being encoded again. No mitmproxy import: the recording package stays usable
without it.

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


# Encodings of mapping keys: a flow's state has the same few dozen keys every time. Bounded, so
# keys that vary (they should not) cannot grow it without end; past the bound they are encoded.
_KEYS: dict[str, bytes] = {}
_KEYS_MAX = 4096


def _key(key: str) -> bytes:
    done = _KEYS.get(key)
    if done is None:
        data = key.encode("utf8")
        done = b"%d:%s;" % (len(data), data)
        if len(_KEYS) < _KEYS_MAX:
            _KEYS[key] = done
    return done


def _scalar(value: Any) -> bytes | None:
    """The encoding of a plain scalar of an exact type; None for anything else."""
    kind = type(value)
    if kind is bytes:
        return b"%d:%s," % (len(value), value)
    if kind is str:
        data = value.encode("utf8")
        return b"%d:%s;" % (len(data), data)
    if value is None:
        return b"0:~"
    if kind is int:
        data = b"%d" % value
        return b"%d:%s#" % (len(data), data)
    if value is True:
        return b"4:true!"
    if value is False:
        return b"5:false!"
    if kind is float:
        data = repr(value).encode()
        return b"%d:%s^" % (len(data), data)
    return None


def _encode(value: Any, parts: list[bytes], known: Mapping[int, bytes]) -> int:
    """Append the encoding of `value` to `parts`; its length.

    Scalars of exact types inside containers are encoded in the container's loop (one function
    call less per value), keys from a small cache, and a pair of byte strings (a header field)
    in one step: the bytes are the reference's, only fewer Python calls make them."""
    kind = type(value)
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
                encoded = _key(key) if type(key) is str else _scalar(key)
                if encoded is None:
                    size += _encode(key, parts, known)
                else:
                    parts.append(encoded)
                    size += len(encoded)
                kind = type(item)
                if kind is bytes:
                    encoded = b"%d:%s," % (len(item), item)
                elif kind is str:
                    data = item.encode("utf8")
                    encoded = b"%d:%s;" % (len(data), data)
                else:
                    encoded = _scalar(item)
                    if encoded is None:
                        size += _encode(item, parts, known)
                        continue
                parts.append(encoded)
                size += len(encoded)
            tail = b"}"
        else:
            for item in value:
                if type(item) is tuple and len(item) == 2:
                    name, field = item
                    if type(name) is bytes and type(field) is bytes:
                        inner = b"%d:%s,%d:%s," % (len(name), name, len(field), field)
                        encoded = b"%d:%s]" % (len(inner), inner)
                        parts.append(encoded)
                        size += len(encoded)
                        continue
                encoded = _scalar(item)
                if encoded is None:
                    size += _encode(item, parts, known)
                else:
                    parts.append(encoded)
                    size += len(encoded)
            tail = b"]"
        head = b"%d:" % size
        parts[at] = head
        parts.append(tail)
        return len(head) + size + 1
    encoded = _scalar(value)
    if encoded is not None:
        parts.append(encoded)
        return len(encoded)
    return _encode_subclass(value, parts, known)


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

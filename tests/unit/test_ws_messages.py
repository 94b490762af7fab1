"""MessageStream: WebSocket text messages of one direction read as one stream (issue 14)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from sluicegate.redaction.messages import OVERFLOW, SPLIT, MessageStream, Outcome, stream_text
from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, load_rule_pack, load_rule_set

RULES = Path(__file__).resolve().parents[2] / "rules"
REDACTOR = Redactor(load_rule_pack([RULES], "default"), Direction.RESPONSE)
GH = "ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"
TAG = "[REDACTED:github-token]"
# The default pack's examples: (text, the secret in it that must not survive).
SECRETS = sorted(
    {
        (p.text, p.secret or p.text)
        for rule in load_rule_set([RULES]).rules
        if rule.id in {r.id for r in REDACTOR.pack.rules_for(Direction.RESPONSE)}
        for p in rule.positives
        if len(p.secret or p.text) >= 8
    }
)
BEFORE = ["", "Sure, here it is: ", "token ", "\n", "the value is ", " and "]
AFTER = ["", "\n", " and more.", " ok", "\nNext step: run it."]


def push_all(
    stream: MessageStream, messages: list[str], timer: frozenset[int] = frozenset()
) -> tuple[list[str], Outcome | None]:
    """Every message through the stream (each also redacted whole, as the gateway does), the
    timer firing after the messages numbered in `timer` and at the end; the released texts in
    order and the failure, if any."""
    out: list[str] = []
    for n, message in enumerate(messages):
        outcome = stream.push(message)
        if outcome.failure is not None:
            return out, outcome
        out += [r.text for r in outcome.released]
        if n in timer:
            outcome = stream.flush()
            if outcome.failure is not None:
                return out, outcome
            out += [r.text for r in outcome.released]
    outcome = stream.flush()
    if outcome.failure is not None:
        return out, outcome
    return out + [r.text for r in outcome.released], None


def cut(text: str, points: list[int]) -> list[str]:
    bounds = sorted({p % (len(text) + 1) for p in points})
    pieces, start = [], 0
    for bound in [*bounds, len(text)]:
        pieces.append(text[start:bound])
        start = bound
    return [p for p in pieces if p] or [text]


def delta(text: str, item: str = "i1") -> str:
    return json.dumps({"type": "response.text.delta", "item_id": item, "delta": text})


def anthropic(text: str, index: int = 0) -> str:
    block = {"type": "text_delta", "text": text}
    return json.dumps({"type": "content_block_delta", "index": index, "delta": block})


# -- the property --------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    secret=st.sampled_from(SECRETS),
    before=st.sampled_from(BEFORE),
    after=st.sampled_from(AFTER),
    points=st.lists(st.integers(0, 400), min_size=1, max_size=5),
    shape=st.sampled_from(["plain", "delta", "anthropic"]),
)
@example(secret=(GH, GH), before="token ", after="", points=[10], shape="plain")
@example(secret=(GH, GH), before="", after=" ok", points=[4, 20, 30], shape="delta")
@example(secret=(GH, GH), before="key: ", after="", points=[len("key: ") + 1], shape="anthropic")
def test_any_split_of_a_secret_across_messages_never_releases_it_in_clear(
    secret: tuple[str, str], before: str, after: str, points: list[int], shape: str
) -> None:
    wrap = {"plain": str, "delta": delta, "anthropic": anthropic}[shape]
    example_text, secret_value = secret
    whole = before + example_text + after
    assume(secret_value not in REDACTOR.redact_text(whole).text)  # found when not split at all
    pieces = cut(whole, points)
    released, failed = push_all(MessageStream(REDACTOR), [wrap(p) for p in pieces])
    texts = [stream_text(m) for m in released] if shape != "plain" else []
    text = "".join(t.text for t in texts if t is not None) if texts else "".join(released)
    assert secret_value not in text
    if failed is None:
        assert len(released) == len(pieces)  # every message, in order
    else:
        assert failed.failure == SPLIT and failed.rules


# -- deciding, releasing ---------------------------------------------------------------------------


def test_clean_text_passes_as_it_arrives_and_nothing_waits() -> None:
    stream = MessageStream(REDACTOR)
    for text in ["hello ", "world", ".\n", '{"type": "ping"}']:
        outcome = stream.push(text)
        assert [r.text for r in outcome.released] == [text] and not outcome.held
    assert stream.held == 0 and stream.pending == 0


def test_a_message_that_may_start_a_secret_waits_for_the_next_one() -> None:
    stream = MessageStream(REDACTOR)
    first = stream.push("my token is ghp_C3J27X")
    assert first.held and first.released == []
    second = stream.push("the rest is not a token at all.")
    assert [r.text for r in second.released] == [
        "my token is ghp_C3J27X",
        "the rest is not a token at all.",
    ]
    assert second.released[0].waited and not second.released[1].waited


@pytest.mark.parametrize(
    "messages",
    [
        ["key " + GH[:9], GH[9:] + " ok"],
        ["key " + GH[:5], GH[5:20], GH[20:]],
        [delta("key " + GH[:9]), delta(GH[9:])],
        [anthropic("key " + GH[:9]), anthropic(GH[9:] + ".")],
    ],
)
def test_a_split_secret_fails_the_stream_before_any_part_is_released(messages: list[str]) -> None:
    stream = MessageStream(REDACTOR)
    released: list[str] = []
    outcome = Outcome()
    for message in messages:
        outcome = stream.push(message)
        released += [r.text for r in outcome.released]
    if outcome.failure is None:  # the last piece ends the token: it could still grow
        assert outcome.held
        outcome = stream.flush()
    assert outcome.failure == SPLIT and outcome.rules == ("github-token",)
    assert all(GH[:5] not in text for text in released)
    assert stream.push("later").failure == SPLIT  # nothing more, ever


def test_a_value_tagged_early_by_whole_message_redaction_is_still_found_across_messages() -> None:
    """`DISCORD_TOKEN=MTk4Nj` alone ends in a short value its message's redaction tags; the stream
    reads the message as it arrived, so the token running into the next message is found."""
    token = "MTk4NjIyNDgzNDcxOTI1MjQ4.4J4N6O.CZFkUUdUYXyVXtwwl6KcChuLc2i"
    released, failed = push_all(MessageStream(REDACTOR), ["DISCORD_TOKEN=" + token[:6], token[6:]])
    assert failed is not None and failed.failure == SPLIT
    assert token[6:] not in "".join(released)


def test_a_secret_inside_one_message_is_tagged_in_it() -> None:
    stream = MessageStream(REDACTOR)
    outcome = stream.push(f"key {GH} here")
    assert [r.text for r in outcome.released] == [f"key {TAG} here"]
    assert stream.counts == {"github-token": 1}


def test_a_value_whose_keyword_came_in_an_earlier_message_is_tagged_in_its_own() -> None:
    released, failed = push_all(MessageStream(REDACTOR), ["password", "=", "hunter2Secret!x ", "."])
    assert failed is None
    assert released[:2] == ["password", "="] and "hunter2Secret" not in released[2]


def test_realtime_deltas_keep_their_json_and_only_the_delta_changes() -> None:
    stream = MessageStream(REDACTOR)
    message = json.dumps({"type": "response.text.delta", "item_id": "i", "delta": f"k {GH} ok"})
    (released,) = stream.push(message).released
    assert json.loads(released.text)["delta"] == f"k {TAG} ok"


def test_other_json_waits_behind_a_held_message_but_is_not_part_of_its_stream() -> None:
    stream = MessageStream(REDACTOR)
    assert stream.push(delta("key " + GH[:9])).held
    audio = json.dumps({"type": "response.audio.delta", "delta": "QUJD"})
    status = json.dumps({"type": "rate_limits.updated"})
    assert stream.push(audio).held and stream.push(status).held
    assert stream.push(delta(GH[9:] + " ok")).failure == SPLIT  # audio did not break the stream


def test_streams_of_different_items_do_not_join() -> None:
    stream = MessageStream(REDACTOR)
    stream.push(delta("key " + GH[:9], item="a"))
    outcome = stream.push(delta(GH[9:] + " ok", item="b"))
    assert outcome.failure is None and outcome.held  # behind item a's message
    released = stream.flush().released
    assert [json.loads(r.text)["delta"] for r in released] == ["key " + GH[:9], GH[9:] + " ok"]


def test_repeated_keys_make_a_message_plain_text() -> None:
    found = stream_text('{"delta": "a", "delta": "b"}')
    assert found is not None and found.text == '{"delta": "a", "delta": "b"}'
    assert stream_text('{"type": "session.updated"}') is None
    assert stream_text("[1, 2]") is not None


# -- the timer -------------------------------------------------------------------------------------


def test_flush_releases_what_waits_redacting_what_it_has() -> None:
    stream = MessageStream(REDACTOR)
    assert stream.push(f"key {GH}").held  # could still grow
    assert [r.text for r in stream.flush().released] == [f"key {TAG}"]


def test_the_rest_of_a_secret_after_a_flush_fails_the_stream() -> None:
    stream = MessageStream(REDACTOR)
    stream.push("key " + GH[:9])
    assert [r.text for r in stream.flush().released] == ["key " + GH[:9]]
    assert stream.push(GH[9:] + " ok").failure == SPLIT
    assert stream.push("x").failure == SPLIT


def test_after_a_flush_clean_text_goes_on() -> None:
    stream = MessageStream(REDACTOR)
    stream.push("key ghp_")
    stream.flush()
    assert [r.text for r in stream.push(" is a prefix. Bye.").released] == [" is a prefix. Bye."]


# -- bounds ----------------------------------------------------------------------------------------


def test_too_many_messages_waiting_overflow() -> None:
    stream = MessageStream(REDACTOR, max_messages=3, overflow="close")
    stream.push(delta("key " + GH[:9]))
    outcomes = [stream.push(json.dumps({"type": "x", "n": n})) for n in range(3)]
    assert [o.failure for o in outcomes] == [None, None, OVERFLOW]


def test_too_many_bytes_waiting_overflow() -> None:
    stream = MessageStream(REDACTOR, max_bytes=2048, overflow="close")
    stream.push(delta("key " + GH[:9]))
    assert stream.push(json.dumps({"type": "x", "pad": "y" * 4000})).failure == OVERFLOW


# -- the redactor's segments -----------------------------------------------------------------


def test_stream_segments_cut_the_released_text_at_each_mark() -> None:
    streamer = REDACTOR.stream(1 << 20, segments=True)
    for piece in ["a ", "key ", GH, " b"]:
        streamer.feed(piece)
        streamer.mark()
    streamer.flush()
    assert streamer.take_segments() == ["a ", "key ", TAG, " b"]
    assert streamer.crossings == []
    with pytest.raises(RuntimeError):
        REDACTOR.stream(10).mark()


def test_past_the_bounds_release_lets_what_waits_go_and_still_catches_the_rest() -> None:
    stream = MessageStream(REDACTOR, max_messages=3, overflow="release")
    stream.push(delta("key " + GH[:9]))
    outcomes = [stream.push(json.dumps({"type": "x", "n": n})) for n in range(3)]
    assert [len(o.released) for o in outcomes] == [0, 0, 4] and stream.forced == 1
    assert outcomes[-1].failure is None and stream.pending == 0
    assert stream.push(delta(GH[9:] + " ok")).failure == SPLIT  # the head left, not the rest


@settings(max_examples=150, deadline=None)
@given(
    secret=st.sampled_from(SECRETS),
    before=st.sampled_from(BEFORE),
    after=st.sampled_from(AFTER),
    points=st.lists(st.integers(0, 400), min_size=1, max_size=5),
    timer=st.frozensets(st.integers(0, 5)),
)
@example(secret=(GH, GH), before="token ", after=" ok", points=[10], timer=frozenset({0}))
@example(
    secret=('<add key="ClearTextPassword" value="Nuget-Feed%Pa55" />', "Nuget-Feed%Pa55"),
    before=" and ",
    after=" and more.",
    points=[55],
    timer=frozenset({0}),
)
def test_the_timer_firing_between_pieces_never_lets_a_secret_out_unnoticed(
    secret: tuple[str, str], before: str, after: str, points: list[int], timer: frozenset[int]
) -> None:
    """The timer releases what it has: a secret whose rule needs the text after it (a closing
    quote) can leave then (see the README's limits), but the stream then fails as soon as that
    text comes, and nothing after it is released."""
    example_text, secret_value = secret
    whole = before + example_text + after
    assume(secret_value not in REDACTOR.redact_text(whole).text)
    pieces = cut(whole, points)
    released, failed = push_all(MessageStream(REDACTOR), pieces, timer)
    if secret_value in "".join(released):
        assert failed is not None and failed.failure == SPLIT
    if failed is not None:
        assert failed.failure == SPLIT


def test_a_fork_flushes_a_copy_and_the_stream_goes_on() -> None:
    streamer = REDACTOR.stream(1 << 20, segments=True)
    streamer.feed("key " + GH[:9])
    streamer.mark()
    twin = streamer.fork()
    twin.flush()
    assert twin.take_segments() == ["key " + GH[:9]]
    assert streamer.take_segments() == []  # still held in the stream itself
    streamer.feed(GH[9:] + " ok")
    streamer.mark()
    assert streamer.crossings == ["github-token"] and twin.crossings == []

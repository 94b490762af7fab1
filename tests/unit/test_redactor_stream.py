"""StreamRedactor: any split of a text streams to exactly the whole-text redaction."""

from __future__ import annotations

import gc
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import regex
from hypothesis import example, given, settings
from hypothesis import strategies as st

from sluicegate.redaction.echo import echo_literals
from sluicegate.redaction.redactor import (
    OVERFLOW_RULE_ID,
    LiteralSecret,
    Redactor,
    StreamTooSlow,
    work_time,
)
from sluicegate.redaction.rules import Direction, load_rule_pack, load_rule_set

RULES = Path(__file__).resolve().parents[2] / "rules"
EXAMPLES = [p.text for rule in load_rule_set([RULES]).rules for p in rule.positives]
SECRETS = {p.secret or p.text for rule in load_rule_set([RULES]).rules for p in rule.positives}
# Streams never decode encoded spans (see redaction/encodings.py): they are compared with
# whole-text redaction without decoding.
REDACTORS = {
    profile: Redactor(load_rule_pack([RULES], profile), Direction.RESPONSE, decode=False)
    for profile in ("default", "strict-pii")
}
PROSE = [
    "Sure, here is the config you asked for:\n\n",
    " and then ",
    "The token is ",
    "password = ",
    '{"api_key": "',
    '"}\n',
    ". Next, run `make deploy` (it takes 2-3 minutes).\n",
    "- step 1: ",
    " https://example.com/docs?page=2 ",
]
GH = "ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"


def split(text: str, rng: random.Random, low: int, high: int) -> list[str]:
    pieces, position = [], 0
    while position < len(text):
        step = rng.randint(low, high)
        pieces.append(text[position : position + step])
        position += step
    return pieces


def stream(redactor: Redactor, pieces: list[str], max_hold: int = 1 << 20) -> tuple[str, dict]:
    streamer = redactor.stream(max_hold=max_hold)
    out = "".join(streamer.feed(piece) for piece in pieces) + streamer.flush()
    return out, streamer.counts


@settings(max_examples=120, deadline=None)
@given(
    parts=st.lists(st.one_of(st.sampled_from(EXAMPLES), st.sampled_from(PROSE)), max_size=6),
    rng=st.randoms(use_true_random=False),
    profile=st.sampled_from(sorted(REDACTORS)),
)
@example(
    parts=[
        '{"api_key": "',
        "The value is 00gAI28EJ8u6MOeFXiBKWS6k5wc22x_y7mmoGPMHbL",
        " and then ",
        '{"api_key": "',
    ],
    rng=random.Random(6),
    profile="default",
)
# A tag reveals the neighbour its secret hid (found by exploration): whole text finds it on its
# second pass, and so must the stream.
@example(
    parts=[
        "The value is ",
        "sdk-564f1453-2e05-ac11-031b-97bd3a3d3b36",
        "AGE-SECRET-KEY-1PS7GV2SFZ8JUR9JSNCSZPJYR3JK7DXZHH7U4LHWQ8KFC89ZE8AFVUR3PXX",
    ],
    rng=random.Random(0),
    profile="default",
)
@example(
    parts=[
        "MAILCHIMP_KEY=c2866c3a98faec23434556c1e237153d-us18",
        "AIRTABLE_TOKEN=patAbCdEfGh12345678.0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
    ],
    rng=random.Random(1),
    profile="strict-pii",
)
def test_examples_in_prose_stream_like_whole_text(
    parts: list[str], rng: random.Random, profile: str
) -> None:
    redactor = REDACTORS[profile]
    text = "".join(parts)
    whole = redactor.redact_text(text)
    out, counts = stream(redactor, split(text, rng, 1, 3))
    if out != whole.text and _widened_quoted_value(whole.text):
        # Whole text's later passes can widen a quoted value around a tag to the whole value
        # (`"api_key": "The value is <okta token> and then {"`, found by exploration); a
        # stream that released the words before the token cannot: the documented difference
        # (docs/ARCHITECTURE.md). Every secret is still redacted.
        assert not [s for s in SECRETS if s in out and s not in whole.text]
        assert set(counts) <= set(whole.counts)
        return
    assert out == whole.text
    assert counts == whole.counts


def _widened_quoted_value(redacted: str) -> bool:
    """Two tags side by side, one a generic value rule's: a later pass's widening."""
    return bool(
        regex.search(r"\[REDACTED:generic-[\w-]+\]\[REDACTED:|\]\[REDACTED:generic-", redacted)
    )


@settings(max_examples=120, deadline=None)
@given(
    text=st.text(alphabet=st.characters(codec="utf-8"), max_size=80)
    | st.text(alphabet="ghp_ABCxyz0123 :=\"'-.@/\n[]REDACTED", max_size=80),
    rng=st.randoms(use_true_random=False),
)
def test_arbitrary_text_streams_like_whole_text(text: str, rng: random.Random) -> None:
    redactor = REDACTORS["strict-pii"]
    out, counts = stream(redactor, split(text, rng, 1, 7))
    whole = redactor.redact_text(text)
    assert (out, counts) == (whole.text, whole.counts)


def test_clean_prose_is_released_as_it_arrives() -> None:
    streamer = REDACTORS["default"].stream(max_hold=4096)
    for token in ["Here", " is", " what", " I", " found", " in", " the", " logs", "."]:
        assert streamer.feed(token) == token
    assert streamer.flush() == ""


def test_a_secret_is_held_until_decided_then_tagged() -> None:
    streamer = REDACTORS["default"].stream(max_hold=4096)
    # ("found", not "token": after a credential word the space itself is held, since
    # `token <value>` is a credential written with a space; see credential-spaced-value)
    released = streamer.feed("found ")
    for char in GH:
        released += streamer.feed(char)
    assert released == "found "  # all of the token is still held back
    assert streamer.held == len(GH)
    released += streamer.feed(" done")
    assert released == "found [REDACTED:github-token] done"
    assert streamer.counts == {"github-token": 1}


def test_held_text_beyond_max_hold_is_replaced_never_released() -> None:
    body = "".join(random.Random(4).choices("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdef0123456789+/", k=1600))
    lines = [body[i : i + 64] for i in range(0, len(body), 64)]
    pem = "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(lines) + "\n-----END RSA PRIVATE KEY-----"
    text = f"Here is the key:\n{pem}\nKeep it safe."
    out, counts = stream(REDACTORS["default"], split(text, random.Random(1), 2, 6), max_hold=300)
    assert counts[OVERFLOW_RULE_ID] >= 1
    assert f"[REDACTED:{OVERFLOW_RULE_ID}]" in out
    assert not any(line in out for line in lines)  # no line of the key body got out
    assert out.startswith("Here is the key:\n") and out.endswith("Keep it safe.")


def test_flush_releases_the_rest_and_closes() -> None:
    streamer = REDACTORS["default"].stream(max_hold=4096)
    # `=` after a token-named key: held until the value is known, with the run of text glued
    # to it (a tag could reveal a secret that its neighbour hid).
    assert streamer.feed("export GITHUB_TOKEN=" + GH) == "export "
    assert streamer.flush() == "GITHUB_TOKEN=[REDACTED:github-token]"
    assert streamer.flush() == ""
    with pytest.raises(RuntimeError) as info:
        streamer.feed("more")
    assert "more" not in str(info.value)


def test_injected_secret_split_across_events_is_masked() -> None:
    secret = "corp-upstream-9f8e7d6c5b4a"
    redactor = REDACTORS["default"].with_literals(echo_literals("injected-credential", secret))
    text = f"The upstream said: invalid key {secret}, please retry."
    for size in (1, 2, 5):
        out, _ = stream(redactor, split(text, random.Random(size), 1, size))
        assert secret not in out and "[REDACTED:injected-credential]" in out
        assert out == redactor.redact_text(text).text


def test_literals_alone_stream_like_whole_text() -> None:
    redactor = REDACTORS["default"].with_literals([LiteralSecret("lit", "abcabcabd")])
    text = "abcabcabcabcabd abcab"
    for seed in range(10):
        assert stream(redactor, split(text, random.Random(seed), 1, 4))[0] == (
            redactor.redact_text(text).text
        )


def test_max_hold_must_be_positive() -> None:
    with pytest.raises(ValueError):
        REDACTORS["default"].stream(max_hold=0)


@pytest.mark.parametrize("profile", sorted(REDACTORS))
def test_a_stream_too_costly_to_redact_is_cut_and_releases_nothing_held(profile: str) -> None:
    # Each `api_key=` keeps partial matches open back to the first: every feed rescans what is
    # held, so unbudgeted the 2,000 feeds took minutes of one thread (the event loop's).
    streamer = REDACTORS[profile].stream(max_hold=4096)
    released = streamer.feed("Sure. ")
    with pytest.raises(StreamTooSlow) as info:
        for _ in range(2000):
            released += streamer.feed("api_key=")
    assert info.value.code == "redaction_timeout"
    assert released.count("api_key=") < 2000  # cut before the end
    assert streamer.flush() == ""  # what was held is never released
    with pytest.raises(RuntimeError):
        streamer.feed("more")


@pytest.fixture
def slow_full_collections() -> Iterator[None]:
    """Every collection of the older generations takes 0.2 s of this thread's CPU, as a full
    collection of a long-running gateway's heap can (150 ms for 3 M objects)."""

    def burn(phase: str, info: dict[str, int]) -> None:
        if phase == "start" and info["generation"] > 0:
            until = time.thread_time() + 0.2
            while time.thread_time() < until:
                pass

    gc.callbacks.append(burn)
    try:
        yield
    finally:
        gc.callbacks.remove(burn)


def test_the_work_clock_leaves_out_full_collections(slow_full_collections: None) -> None:
    cpu, work = time.thread_time(), work_time()
    gc.collect()
    assert time.thread_time() - cpu >= 0.2
    assert work_time() - work < 0.1


def test_full_collections_during_feeds_do_not_cut_the_stream(slow_full_collections: None) -> None:
    # Pauses the text did not cause (CI's 3.12 run cut a property test's stream this way): six
    # collections in six feeds take 1.2 s of CPU, more than a whole stream's budget.
    redactor = REDACTORS["default"]
    streamer = redactor.stream(max_hold=4096)
    real = streamer._reread
    assert real is not None

    def collecting(chunk: str) -> object:
        gc.collect()  # inside the feed: released text with a tag is read again
        return real(chunk)

    streamer._reread = collecting  # type: ignore[assignment]
    parts = [f"The token is {GH} and then " for _ in range(6)] + [PROSE[0] * 20]
    released = "".join(streamer.feed(part) for part in parts) + streamer.flush()
    assert released == redactor.redact_text("".join(parts)).text


def test_ordinary_text_in_one_large_piece_or_in_tokens_is_never_cut() -> None:
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()[:65536]
    for profile, redactor in REDACTORS.items():
        whole = redactor.redact_text(text).text
        assert stream(redactor, [text])[0] == whole, profile
        assert stream(redactor, split(text, random.Random(3), 2, 6))[0] == whole, profile

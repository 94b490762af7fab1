"""The README benchmark counts 503 refusals (a redaction budget, recording unavailable) and goes
on, leaving them out of the figures and saying so in the row; anything else stops it."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from bench.gateway import Round, _ok, error_code, merge_refused
from bench.lib import HttpError, Response
from bench.readme import _interleaved_values, refusals


def answer(status: int, code: str | None = None) -> Response:
    body = json.dumps({"error": {"code": code, "message": "m"}}).encode() if code else b"oops"
    return Response(status, {}, body)


async def ready(response: Response) -> Response:
    return response


def ok(response: Response, refused: dict[str, int] | None) -> bool:
    return asyncio.run(_ok(ready(response), refused))


def test_a_200_is_an_answer_and_a_503_is_counted_by_its_code() -> None:
    refused: dict[str, int] = {}
    assert ok(answer(200), refused)
    assert not ok(answer(503, "redaction_timeout"), refused)
    assert not ok(answer(503, "redaction_timeout"), refused)
    assert not ok(answer(503), refused)
    assert refused == {"503 redaction_timeout": 2, "503 ?": 1}


@pytest.mark.parametrize("status", [400, 403, 500, 502])
def test_other_answers_stop_the_benchmark(status: int) -> None:
    with pytest.raises(SystemExit):
        ok(answer(status, "x"), {})
    with pytest.raises(SystemExit):
        ok(answer(503, "x"), None)  # where nothing counts refusals, a 503 stops it too


def test_error_code_reads_the_gateways_json_error_only() -> None:
    assert error_code(b'{"error": {"code": "recording_unavailable"}}') == "recording_unavailable"
    for body in (b"", b"[]", b'{"error": "x"}', b'{"error": {"code": 5}}'):
        assert error_code(body) == "?"


def test_rounds_refusals_are_merged_and_shown_in_the_row() -> None:
    rounds = [Round(refused={"503 a": 1}), Round(refused={"503 a": 2, "503 b": 1}), Round()]
    merged = merge_refused(rounds)
    assert merged == {"503 a": 3, "503 b": 1}
    assert refusals(merged) == " (refused, not counted: 3 x 503 a, 1 x 503 b)"
    assert refusals({}) == ""


def test_a_refused_round_is_left_out_and_repeated() -> None:
    calls: dict[str, int] = {"bare": 0, "gateway": 0}
    values = {"bare": iter([1.0, 1.0, 1.0, 1.0]), "gateway": iter([2.0, -1, 4.0, 3.0, 5.0])}

    def measure(process: Any) -> float:
        calls[process] += 1
        value = next(values[process])
        if value < 0:
            raise HttpError(503)
        return value

    refused: dict[str, int] = {}
    proxies: Any = {"bare": "bare", "gateway": "gateway"}
    medians = _interleaved_values(proxies, 2, measure, refused)
    # gateway: warm-up 2.0, then a refused round repeated (4.0), then 3.0: median of 4.0, 3.0
    assert medians == {"bare": 1.0, "gateway": 3.5}
    assert refused == {"gateway 503": 1}
    assert calls == {"bare": 3, "gateway": 4}


def test_a_stream_that_is_always_refused_stops_the_benchmark() -> None:
    def measure(process: Any) -> float:
        if process == "gateway":
            raise HttpError(503)
        return 1.0

    with pytest.raises(SystemExit):
        _interleaved_values({"bare": "bare", "gateway": "gateway"}, 1, measure)  # type: ignore[dict-item]


def test_other_stream_errors_still_stop_it() -> None:
    def measure(process: Any) -> float:
        raise HttpError(502)

    with pytest.raises(HttpError):
        _interleaved_values({"bare": "bare"}, 1, measure)  # type: ignore[dict-item]

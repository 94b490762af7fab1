"""`python -m sluicegate redact` and `rules test`, run as the operator would (subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GH = "ghp_C3J27XDCG2LmlZGEONYlgCtjfIZ4SOcMz9CP"


def run(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "addons")}
    return subprocess.run(
        [sys.executable, "-m", "sluicegate", *args],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )


def test_redact_stdin_to_stdout_with_a_summary_on_stderr() -> None:
    text = f'export GITHUB_TOKEN={GH}\npassword = "Sup3r-secret!"\n'
    result = run("redact", stdin=text.encode())
    assert result.returncode == 0
    assert result.stdout.decode() == (
        'export GITHUB_TOKEN=[REDACTED:github-token]\npassword = "[REDACTED:generic-password]"\n'
    )
    summary = result.stderr.decode()
    assert "2 redaction(s)" in summary and "github-token: 1" in summary
    assert GH not in summary and "Sup3r" not in summary


def test_redact_file_with_content_type_and_profile(tmp_path: Path) -> None:
    body = tmp_path / "body.json"
    body.write_text(json.dumps({"contact": "jane@acme-corp.io", "api_key": "k-123456"}))
    result = run("redact", "--content-type", "application/json", "--profile", "pii", str(body))
    assert result.returncode == 0
    assert json.loads(result.stdout) == {
        "contact": "[REDACTED:email-address]",
        "api_key": "[REDACTED:key-api-key]",
    }
    default = run("redact", "--content-type", "application/json", str(body))
    assert json.loads(default.stdout)["contact"] == "jane@acme-corp.io"


def test_redact_jsonl_records() -> None:
    lines = [
        {"id": 1, "text": f"token {GH}"},
        {"id": 2, "text": json.dumps({"password": "x1"}), "content_type": "application/json"},
        {"id": 3, "text": "nothing here"},
    ]
    stdin = "".join(json.dumps(line) + "\n" for line in lines).encode()
    result = run("redact", "--jsonl", stdin=stdin)
    assert result.returncode == 0
    out = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert out == [
        {"id": 1, "text": "token [REDACTED:github-token]"},
        {
            "id": 2,
            "text": '{"password":"[REDACTED:key-password]"}',
            "content_type": "application/json",
        },
        {"id": 3, "text": "nothing here"},
    ]


def test_redact_jsonl_rejects_records_without_text() -> None:
    result = run("redact", "--jsonl", stdin=b'{"body": "x"}\n')
    assert result.returncode == 2
    assert b"line 1" in result.stderr


def test_redact_with_own_rules_and_direction(tmp_path: Path) -> None:
    rules = tmp_path / "mine.yaml"
    rules.write_text(
        "rules:\n"
        "  - id: ticket-id\n"
        "    description: internal ticket numbers\n"
        "    pattern: 'TCK-\\d{6}'\n"
        "    direction: response\n"
        "    profiles: [default]\n"
        "    examples: {positive: ['TCK-123456']}\n"
    )
    stdin = f"TCK-123456 {GH}".encode()
    request = run("redact", "--rules", str(rules), stdin=stdin)
    assert request.stdout == stdin  # response-only rule; the default pack is not loaded
    response = run("redact", "--rules", str(rules), "--direction", "response", stdin=stdin)
    assert response.stdout == f"[REDACTED:ticket-id] {GH}".encode()


def test_bad_rule_file_is_reported_with_its_key_path(tmp_path: Path) -> None:
    rules = tmp_path / "bad.yaml"
    rules.write_text("rules:\n  - id: x\n    pattern: '('\n")
    result = run("redact", "--rules", str(rules), stdin=b"x")
    assert result.returncode == 2
    assert b"bad.yaml: rules[0]" in result.stderr


def test_rules_test_passes_on_the_default_pack() -> None:
    result = run("rules", "test")
    assert result.returncode == 0, result.stdout.decode()[-2000:]
    assert b"0 failure(s)" in result.stdout


def test_rules_test_reports_failing_examples(tmp_path: Path) -> None:
    rules = tmp_path / "weak.yaml"
    rules.write_text(
        "rules:\n"
        "  - id: weak-rule\n"
        "    description: misses its own example\n"
        "    pattern: 'abc\\d{3}'\n"
        "    profiles: [default]\n"
        "    examples: {positive: ['abc12'], negative: ['abc123']}\n"
    )
    result = run("rules", "test", "--rules", str(rules))
    assert result.returncode == 1
    out = result.stdout.decode()
    assert "FAIL" in out and "weak-rule: examples.positive[0]" in out
    assert "examples.negative[0]" in out and "2 failure(s)" in out

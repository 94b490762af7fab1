"""Hash chain and signatures: a clean session verifies; every edit is found and located.

Chain version 2 (signed heads every few flows) is what the gateway writes; version 1 (every flow
line signed) still verifies. Tests that hold for both run on both."""

from __future__ import annotations

import hashlib
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sluicegate.recording import chain

SIGNER = chain.Signer.generate()


def record(payload: bytes) -> bytes:
    """A top-level tnetstring (a byte string), like a flow record is framed."""
    return b"%d:%s," % (len(payload), payload)


def build(
    n: int,
    *,
    sealed: bool = True,
    signer: chain.Signer = SIGNER,
    version: int = 2,
    head_every: int = 3,
    final_head: bool = True,
    audit: bool = False,
) -> tuple[list[bytes], str, list[str]]:
    """`n` records, the chain text, and the flow ids. Version 2: a signed head after every
    `head_every` flows and, unsealed, after the last flow unless `final_head` is False."""
    writer = chain.ChainWriter(
        "alice-1234/s1.mitm",
        signer,
        identity="alice",
        created=1.0,
        version=version,
        head_every_flows=head_every,
    )
    lines = [chain.dump_line(writer.opening())]
    records, ids = [], []
    for i in range(n):
        flow_id = f"flow-{i}"
        rec = record(f"flow {i} body {'x' * i}".encode())
        lines.append(chain.dump_line(writer.append(flow_id, rec, f"audit-{i}" if audit else None)))
        if writer.head_due(1.0):
            lines.append(chain.dump_line(writer.signed_head(1.0)))
        records.append(rec)
        ids.append(flow_id)
    if sealed:
        lines.append(chain.dump_line(writer.seal("shutdown", 2.0)))
    elif final_head and writer.count > writer.signed_count:
        lines.append(chain.dump_line(writer.signed_head(2.0)))
    return records, b"".join(lines).decode(), ids


def check(records: list[bytes], text: str, **kw) -> chain.Verdict:
    return chain.verify(b"".join(records), text, trusted_key=SIGNER.public_key, **kw)


VERSIONS = pytest.mark.parametrize("version", [1, 2])


def kinds(verdict: chain.Verdict) -> list[tuple[str, int | None, str | None]]:
    return [(f.kind, f.index, f.flow_id) for f in verdict.findings]


@VERSIONS
def test_clean_sealed_session_verifies(version: int) -> None:
    records, text, _ = build(5, version=version)
    verdict = check(records, text)
    assert verdict.status == "ok", kinds(verdict)
    assert verdict.sealed and verdict.key_trusted
    assert verdict.flows_in_chain == verdict.records_in_file == 5


@VERSIONS
def test_unsealed_session_is_consistent_but_not_ok(version: int) -> None:
    records, text, _ = build(3, sealed=False, version=version)
    verdict = check(records, text)
    assert verdict.status == "unsealed"
    assert verdict.findings == []


@VERSIONS
def test_empty_session_verifies(version: int) -> None:
    records, text, _ = build(0, version=version)
    assert check(records, text).status == "ok"


@VERSIONS
def test_modified_byte_names_the_flow(version: int) -> None:
    records, text, ids = build(4, version=version)
    records[2] = records[2].replace(b"body", b"bodY")
    verdict = check(records, text)
    assert verdict.status == "failed"
    assert kinds(verdict) == [("modified", 2, ids[2])]


@VERSIONS
def test_removed_flow_names_the_flow(version: int) -> None:
    records, text, ids = build(4, version=version)
    del records[1]
    verdict = check(records, text)
    assert kinds(verdict) == [("removed", 1, ids[1])]


@VERSIONS
def test_swapped_flows_are_reported_as_moved(version: int) -> None:
    records, text, ids = build(4, version=version)
    records[1], records[2] = records[2], records[1]
    found = kinds(check(records, text))
    assert found and all(kind == "moved" for kind, _, _ in found)
    assert {flow_id for _, _, flow_id in found} <= {ids[1], ids[2]}


@VERSIONS
def test_distant_swap_is_not_mistaken_for_modification(version: int) -> None:
    records, text, ids = build(5, version=version)
    records[0], records[4] = records[4], records[0]
    found = kinds(check(records, text))
    assert found and all(kind == "moved" for kind, _, _ in found)
    assert {flow_id for _, _, flow_id in found} <= {ids[0], ids[4]}


@VERSIONS
def test_inserted_record_is_reported_with_its_position(version: int) -> None:
    records, text, _ = build(3, version=version)
    records.insert(1, record(b"forged"))
    verdict = check(records, text, record_id=lambda data: "forged-id")
    assert kinds(verdict) == [("inserted", 1, "forged-id")]


@VERSIONS
def test_broken_framing_is_reported(version: int) -> None:
    records, text, ids = build(3, version=version)
    records[1] = b"x" + records[1][1:]  # the length prefix is no longer digits
    verdict = check(records, text)
    assert verdict.status == "failed"
    assert ("modified", 1, ids[1]) in kinds(verdict)


def test_edited_chain_line_fails_its_signature_v1() -> None:
    records, text, _ = build(3, version=1)
    lines = text.splitlines()
    entry = json.loads(lines[2])
    entry["length"] += 1
    lines[2] = json.dumps(entry)
    verdict = check(records, "\n".join(lines) + "\n")
    assert ("bad_signature", 1, "flow-1") in kinds(verdict)


@VERSIONS
def test_chain_rebuilt_with_another_key_is_not_trusted(version: int) -> None:
    records, text, _ = build(3, signer=chain.Signer.generate(), version=version)
    verdict = check(records, text)
    assert verdict.status == "failed"
    assert "untrusted_key" in [f.kind for f in verdict.findings]
    assert "bad_signature" in [f.kind for f in verdict.findings]


@VERSIONS
def test_without_a_trusted_key_the_embedded_key_is_used_and_flagged(version: int) -> None:
    records, text, _ = build(2, version=version)
    verdict = chain.verify(b"".join(records), text)
    assert verdict.status == "ok"
    assert not verdict.key_trusted


def test_cutting_the_tail_of_a_sealed_session_is_detected() -> None:
    records, text, _ = build(4)
    lines = text.splitlines()
    del lines[-2]  # the last flow's chain entry; the seal stays
    verdict = check(records[:-1], "\n".join(lines) + "\n")
    assert "seal_mismatch" in [f.kind for f in verdict.findings]


@VERSIONS
def test_record_without_chain_entry_after_a_crash_is_a_warning(version: int) -> None:
    records, text, _ = build(3, sealed=False, version=version)
    records.append(record(b"written, then killed"))
    verdict = check(records, text, record_id=lambda data: "last")
    assert verdict.status == "unsealed"
    assert kinds(verdict) == [("unchained_tail", 3, "last")]


def test_chain_line_cut_by_a_crash_is_a_warning_v1() -> None:
    records, text, _ = build(3, sealed=False, version=1)
    verdict = check(records, text[: text.rstrip("\n").rfind("\n") + 10])
    assert verdict.status == "unsealed", kinds(verdict)
    assert [f.kind for f in verdict.findings] == ["chain_line_unreadable", "unchained_tail"]


@VERSIONS
def test_chain_of_another_session_does_not_verify(version: int) -> None:
    records, text, _ = build(2, version=version)
    lines = text.splitlines()
    opening = json.loads(lines[0])
    opening["session"] = "bob-5678/s9.mitm"
    lines[0] = json.dumps(SIGNER.signed({k: v for k, v in opening.items() if k != "sig"}))
    verdict = check(records, "\n".join(lines) + "\n")
    assert "bad_genesis" in [f.kind for f in verdict.findings]


# -- version 2: unsigned flow lines, signed heads ------------------------------------------------


def lines_of(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def text_of(entries: list[dict]) -> str:
    return "".join(chain.dump_line(e).decode() for e in entries)


def test_v2_signs_heads_not_flow_lines() -> None:
    _, text, _ = build(7, version=2, head_every=3)
    entries = lines_of(text)
    assert entries[0]["version"] == 2
    flows = [e for e in entries if e["type"] == "flow"]
    heads = [e for e in entries if e["type"] == "head"]
    assert len(flows) == 7 and not any("sig" in e for e in flows)
    assert [h["count"] for h in heads] == [3, 6]  # then the seal covers all 7
    assert entries[-1]["type"] == "seal" and entries[-1]["count"] == 7


def test_writer_owes_a_head_after_the_flow_count_or_the_interval() -> None:
    writer = chain.ChainWriter(
        "s", SIGNER, identity="a", created=10.0, head_every_flows=256, head_every_seconds=1.0
    )
    assert not writer.head_due(99.0)  # nothing to sign
    for i in range(255):
        writer.append(f"f{i}", record(b"x"))
    assert not writer.head_due(10.5)
    assert writer.head_due(11.0)  # a second after the last signature
    writer.append("f255", record(b"x"))
    assert writer.head_due(10.5)  # 256 unsigned flows
    head = writer.signed_head(10.5)
    assert head["count"] == 256 and chain.signature_ok(SIGNER.public_key, head)
    writer.append("f256", record(b"x"))
    assert not writer.head_due(11.4) and writer.head_due(11.5)


def test_v2_tail_after_the_last_signed_head_is_reported_unsigned() -> None:
    records, text, ids = build(5, sealed=False, head_every=3, final_head=False)
    verdict = check(records, text)
    assert verdict.status == "unsealed"  # not a failure: a crash or a running gateway
    assert kinds(verdict) == [("unsigned_tail", 3, ids[3])]
    assert not verdict.findings[0].fatal


def test_v2_edited_flow_line_breaks_the_chain() -> None:
    records, text, _ = build(4, audit=True)
    for field, value in (("length", 999), ("offset", 1), ("audit", "forged")):
        entries = lines_of(text)
        entries[2][field] = value  # flow #1 (line 0 is the opening)
        verdict = check(records, text_of(entries))
        assert verdict.status == "failed", field
        assert ("chain_broken", 1, "flow-1") in kinds(verdict), field


def rechain(entries: list[dict]) -> list[dict]:
    """What a forger without the key can do: recompute every flow line's chain hash."""
    head = chain.genesis(entries[0]["session"])
    count = 0
    for entry in entries[1:]:
        if entry["type"] == "flow":
            head = chain.entry_link(2, head, count, entry)
            entry["chain"] = head
            count += 1
    return entries


@pytest.mark.parametrize("sealed", [True, False])
def test_v2_rewritten_and_rechained_flow_lines_fail_the_signed_head(sealed: bool) -> None:
    records, text, _ = build(5, sealed=sealed, head_every=2, audit=True)
    entries = lines_of(text)
    entries[1]["audit"] = "forged"  # flow #0's audit hash, so an edited audit line would match
    verdict = check(records, text_of(rechain(entries)))
    assert verdict.status == "failed"
    found = [f.kind for f in verdict.findings]
    assert "head_mismatch" in found  # the head after flow #1 no longer matches
    assert "chain_broken" not in found  # the forger made the flow lines consistent


def test_v2_record_and_its_line_replaced_together_fail_the_signed_head() -> None:
    records, text, _ = build(4, head_every=2)
    forged = record(b"forged flow")
    records[1] = forged
    entries = lines_of(text)
    line = next(e for e in entries if e.get("index") == 1)
    line["sha256"] = hashlib.sha256(forged).hexdigest()
    line["length"] = len(forged)
    verdict = check(records, text_of(rechain(entries)))
    assert verdict.status == "failed"
    assert "head_mismatch" in [f.kind for f in verdict.findings]


def test_v2_forged_head_line_fails_its_signature() -> None:
    records, text, _ = build(4, head_every=2)
    entries = lines_of(text)
    head = next(e for e in entries if e["type"] == "head")
    head["count"] = 1
    verdict = check(records, text_of(entries))
    assert verdict.status == "failed"
    assert {"bad_signature", "head_mismatch"} <= {f.kind for f in verdict.findings}


def test_v2_removing_signed_heads_only_leaves_an_unsigned_tail_that_is_not_ok() -> None:
    """Dropping every head (and the seal) cannot make rewritten lines pass as proven."""
    records, text, _ = build(4, head_every=2, sealed=False)
    entries = [e for e in lines_of(text) if e["type"] != "head"]
    verdict = check(records, text_of(entries))
    assert verdict.status == "unsealed"
    assert [f.kind for f in verdict.findings] == ["unsigned_tail"]


def test_v2_cut_head_line_after_a_crash_is_a_warning() -> None:
    records, text, _ = build(3, sealed=False, head_every=2)
    verdict = check(records, text[: text.rstrip("\n").rfind("\n") + 10])
    assert verdict.status == "unsealed", kinds(verdict)
    assert [f.kind for f in verdict.findings] == ["chain_line_unreadable", "unsigned_tail"]


def test_unknown_chain_version_fails() -> None:
    records, text, _ = build(2)
    entries = lines_of(text)
    opening = {k: v for k, v in entries[0].items() if k != "sig"}
    entries[0] = SIGNER.signed({**opening, "version": 9})
    verdict = check(records, text_of(entries))
    assert "chain_version" in [f.kind for f in verdict.findings]
    assert verdict.status == "failed"


def test_split_records_reports_where_framing_breaks() -> None:
    data = record(b"a") + record(b"bc") + b"12:short"
    spans, broken = chain.split_records(data)
    assert spans == [(0, 4), (4, 5)]
    assert broken == 9


def test_key_loading_errors_name_no_material() -> None:
    with pytest.raises(chain.ChainKeyError):
        chain.Signer.from_pem("-----BEGIN PRIVATE KEY-----\nnope\n-----END PRIVATE KEY-----")
    assert chain.load_public_key(SIGNER.public_pem()).public_bytes_raw() == (
        SIGNER.public_key.public_bytes_raw()
    )
    assert chain.Signer.from_pem(SIGNER.private_pem()).key_id == SIGNER.key_id


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(min_value=2, max_value=12),
    op=st.sampled_from(["modify", "drop", "swap"]),
    where=st.integers(min_value=0, max_value=1000),
    byte=st.integers(min_value=0, max_value=1000),
    version=st.sampled_from([1, 2]),
)
def test_any_single_tampering_is_detected_and_located(
    n: int, op: str, where: int, byte: int, version: int
):
    records, text, ids = build(n, version=version)
    i = where % n
    if op == "modify":
        rec = bytearray(records[i])
        pos = byte % len(rec)
        rec[pos] ^= 0x01
        records[i] = bytes(rec)
        expected = {i}
    elif op == "drop":
        del records[i]
        expected = {i}
    else:
        j = (i + 1 + byte % (n - 1)) % n
        records[i], records[j] = records[j], records[i]
        expected = {i, j}
    verdict = check(records, text)
    assert verdict.status == "failed"
    located = {f.index for f in verdict.findings if f.flow_id in ids}
    assert located & expected, kinds(verdict)

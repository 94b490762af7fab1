"""Hash chain and signatures: a clean session verifies; every edit is found and located."""

from __future__ import annotations

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
    n: int, *, sealed: bool = True, signer: chain.Signer = SIGNER
) -> tuple[list[bytes], str, list[str]]:
    """`n` records, the chain text, and the flow ids."""
    writer = chain.ChainWriter("alice-1234/s1.mitm", signer, identity="alice", created=1.0)
    lines = [chain.dump_line(writer.opening())]
    records, ids = [], []
    for i in range(n):
        flow_id = f"flow-{i}"
        rec = record(f"flow {i} body {'x' * i}".encode())
        lines.append(chain.dump_line(writer.append(flow_id, rec)))
        records.append(rec)
        ids.append(flow_id)
    if sealed:
        lines.append(chain.dump_line(writer.seal("shutdown", 2.0)))
    return records, b"".join(lines).decode(), ids


def check(records: list[bytes], text: str, **kw) -> chain.Verdict:
    return chain.verify(b"".join(records), text, trusted_key=SIGNER.public_key, **kw)


def kinds(verdict: chain.Verdict) -> list[tuple[str, int | None, str | None]]:
    return [(f.kind, f.index, f.flow_id) for f in verdict.findings]


def test_clean_sealed_session_verifies() -> None:
    records, text, _ = build(5)
    verdict = check(records, text)
    assert verdict.status == "ok", kinds(verdict)
    assert verdict.sealed and verdict.key_trusted
    assert verdict.flows_in_chain == verdict.records_in_file == 5


def test_unsealed_session_is_consistent_but_not_ok() -> None:
    records, text, _ = build(3, sealed=False)
    verdict = check(records, text)
    assert verdict.status == "unsealed"
    assert verdict.findings == []


def test_empty_session_verifies() -> None:
    records, text, _ = build(0)
    assert check(records, text).status == "ok"


def test_modified_byte_names_the_flow() -> None:
    records, text, ids = build(4)
    records[2] = records[2].replace(b"body", b"bodY")
    verdict = check(records, text)
    assert verdict.status == "failed"
    assert kinds(verdict) == [("modified", 2, ids[2])]


def test_removed_flow_names_the_flow() -> None:
    records, text, ids = build(4)
    del records[1]
    verdict = check(records, text)
    assert kinds(verdict) == [("removed", 1, ids[1])]


def test_swapped_flows_are_reported_as_moved() -> None:
    records, text, ids = build(4)
    records[1], records[2] = records[2], records[1]
    found = kinds(check(records, text))
    assert found and all(kind == "moved" for kind, _, _ in found)
    assert {flow_id for _, _, flow_id in found} <= {ids[1], ids[2]}


def test_distant_swap_is_not_mistaken_for_modification() -> None:
    records, text, ids = build(5)
    records[0], records[4] = records[4], records[0]
    found = kinds(check(records, text))
    assert found and all(kind == "moved" for kind, _, _ in found)
    assert {flow_id for _, _, flow_id in found} <= {ids[0], ids[4]}


def test_inserted_record_is_reported_with_its_position() -> None:
    records, text, _ = build(3)
    records.insert(1, record(b"forged"))
    verdict = check(records, text, record_id=lambda data: "forged-id")
    assert kinds(verdict) == [("inserted", 1, "forged-id")]


def test_broken_framing_is_reported() -> None:
    records, text, ids = build(3)
    records[1] = b"x" + records[1][1:]  # the length prefix is no longer digits
    verdict = check(records, text)
    assert verdict.status == "failed"
    assert ("modified", 1, ids[1]) in kinds(verdict)


def test_edited_chain_line_fails_its_signature() -> None:
    records, text, _ = build(3)
    lines = text.splitlines()
    entry = json.loads(lines[2])
    entry["length"] += 1
    lines[2] = json.dumps(entry)
    verdict = check(records, "\n".join(lines) + "\n")
    assert ("bad_signature", 1, "flow-1") in kinds(verdict)


def test_chain_rebuilt_with_another_key_is_not_trusted() -> None:
    records, text, _ = build(3, signer=chain.Signer.generate())
    verdict = check(records, text)
    assert verdict.status == "failed"
    assert "untrusted_key" in [f.kind for f in verdict.findings]
    assert "bad_signature" in [f.kind for f in verdict.findings]


def test_without_a_trusted_key_the_embedded_key_is_used_and_flagged() -> None:
    records, text, _ = build(2)
    verdict = chain.verify(b"".join(records), text)
    assert verdict.status == "ok"
    assert not verdict.key_trusted


def test_cutting_the_tail_of_a_sealed_session_is_detected() -> None:
    records, text, _ = build(4)
    lines = text.splitlines()
    del lines[-2]  # the last flow's chain entry; the seal stays
    verdict = check(records[:-1], "\n".join(lines) + "\n")
    assert "seal_mismatch" in [f.kind for f in verdict.findings]


def test_record_without_chain_entry_after_a_crash_is_a_warning() -> None:
    records, text, _ = build(3, sealed=False)
    records.append(record(b"written, then killed"))
    verdict = check(records, text, record_id=lambda data: "last")
    assert verdict.status == "unsealed"
    assert kinds(verdict) == [("unchained_tail", 3, "last")]


def test_chain_line_cut_by_a_crash_is_a_warning() -> None:
    records, text, _ = build(3, sealed=False)
    verdict = check(records, text[: text.rstrip("\n").rfind("\n") + 10])
    assert verdict.status == "unsealed", kinds(verdict)
    assert [f.kind for f in verdict.findings] == ["chain_line_unreadable", "unchained_tail"]


def test_chain_of_another_session_does_not_verify() -> None:
    records, text, _ = build(2)
    lines = text.splitlines()
    opening = json.loads(lines[0])
    opening["session"] = "bob-5678/s9.mitm"
    lines[0] = json.dumps(SIGNER.signed({k: v for k, v in opening.items() if k != "sig"}))
    verdict = check(records, "\n".join(lines) + "\n")
    assert "bad_genesis" in [f.kind for f in verdict.findings]


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
)
def test_any_single_tampering_is_detected_and_located(n: int, op: str, where: int, byte: int):
    records, text, ids = build(n)
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

"""`python -m sluicegate ca`: the confdir mitmproxy loads, and rotation that widens trust first."""

from __future__ import annotations

import datetime
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from mitmproxy import certs

from sluicegate.cli import ca

KEY_SIZE = "2048"  # fast enough for tests; the default is 3072


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = ca.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def init(capsys: pytest.CaptureFixture[str], confdir: Path) -> None:
    code, _, err = run(capsys, "init", "--confdir", str(confdir), "--key-size", KEY_SIZE)
    assert code == 0, err


def exported(capsys: pytest.CaptureFixture[str], confdir: Path) -> list[x509.Certificate]:
    code, out, _ = run(capsys, "export", "--confdir", str(confdir))
    assert code == 0
    assert "PRIVATE KEY" not in out
    return x509.load_pem_x509_certificates(out.encode())


def test_init_writes_a_confdir_mitmproxy_loads_and_signs_with(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    confdir = tmp_path / "confdir"
    init(capsys, confdir)
    assert sorted(p.name for p in confdir.iterdir()) == sorted(ca.FILES)
    for name in ("mitmproxy-ca.pem", "mitmproxy-ca.p12"):
        assert stat.S_IMODE((confdir / name).stat().st_mode) == 0o600
    cert = x509.load_pem_x509_certificate((confdir / ca.CERT).read_bytes())
    constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    assert "sluicegate gateway CA" in cert.subject.rfc4514_string()

    store = certs.CertStore.from_store(confdir, "mitmproxy", 2048)
    assert store.default_ca.to_pem() == (confdir / ca.CERT).read_bytes()
    leaf = store.get_cert("api.example.com", [x509.DNSName("api.example.com")])
    leaf.cert._cert.verify_directly_issued_by(cert)
    # mitmproxy found everything it needs and wrote nothing of its own
    assert sorted(p.name for p in confdir.iterdir()) == sorted(ca.FILES)


def test_init_refuses_to_replace_a_ca(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    init(capsys, tmp_path)
    before = (tmp_path / ca.KEY_AND_CERT).read_bytes()
    code, _, err = run(capsys, "init", "--confdir", str(tmp_path), "--key-size", KEY_SIZE)
    assert code == 1
    assert "ca rotate stage" in err
    assert (tmp_path / ca.KEY_AND_CERT).read_bytes() == before


def test_rotation_widens_trust_before_the_switch_and_narrows_it_after(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    init(capsys, tmp_path)
    first = x509.load_pem_x509_certificate((tmp_path / ca.CERT).read_bytes())
    assert exported(capsys, tmp_path) == [first]

    code, out, _ = run(
        capsys, "rotate", "stage", "--confdir", str(tmp_path), "--key-size", KEY_SIZE
    )
    assert code == 0 and "ca rotate activate" in out
    second = x509.load_pem_x509_certificate((tmp_path / "next" / ca.CERT).read_bytes())
    assert (tmp_path / ca.CERT).read_bytes() == first.public_bytes(serialization.Encoding.PEM)
    assert exported(capsys, tmp_path) == [first, second]
    code, _, err = run(capsys, "rotate", "stage", "--confdir", str(tmp_path))
    assert code == 1 and "already staged" in err

    code, _, _ = run(capsys, "rotate", "activate", "--confdir", str(tmp_path))
    assert code == 0
    assert x509.load_pem_x509_certificate((tmp_path / ca.CERT).read_bytes()) == second
    assert not (tmp_path / "next").exists()
    assert exported(capsys, tmp_path) == [second, first]  # the old one stays trusted
    code, out, _ = run(capsys, "status", "--confdir", str(tmp_path))
    assert [line.split()[0] for line in out.splitlines() if not line.startswith(" ")] == [
        "active",
        "retired",
    ]
    store = certs.CertStore.from_store(tmp_path, "mitmproxy", 2048)
    store.get_cert("h.example", [x509.DNSName("h.example")]).cert._cert.verify_directly_issued_by(
        second
    )

    code, out, _ = run(capsys, "rotate", "finish", "--confdir", str(tmp_path))
    assert code == 0 and "removed" in out
    assert not any((tmp_path / "retired").iterdir())
    assert exported(capsys, tmp_path) == [second]


def test_activate_needs_a_staged_ca(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    init(capsys, tmp_path)
    code, _, err = run(capsys, "rotate", "activate", "--confdir", str(tmp_path))
    assert code == 1 and "ca rotate stage" in err
    assert (tmp_path / ca.KEY_AND_CERT).exists()


def test_commands_on_a_confdir_without_a_ca_say_to_init(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    for args in (["export"], ["status"], ["rotate", "stage"]):
        code, out, err = run(capsys, *args, "--confdir", str(tmp_path))
        assert code == 1 and "ca init" in err and out == ""
    assert list(tmp_path.iterdir()) == []


def test_export_to_a_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    init(capsys, tmp_path / "c")
    out_file = tmp_path / "agent-ca.pem"
    code, out, err = run(capsys, "export", "--confdir", str(tmp_path / "c"), "--out", str(out_file))
    assert code == 0 and out == "" and "exported active" in err
    assert out_file.read_bytes() == (tmp_path / "c" / ca.CERT).read_bytes()
    assert stat.S_IMODE(out_file.stat().st_mode) == 0o644


def test_validity_and_expiry_warning() -> None:
    now = datetime.datetime(2030, 1, 1, tzinfo=datetime.UTC)
    _, cert = ca.build_ca("acme", 30, 2048, now=now)
    assert cert.not_valid_after_utc == now + datetime.timedelta(days=30)
    assert cert.not_valid_before_utc == now - ca.BACKDATE
    info = ca.CaInfo("active", Path("/x"), cert)
    assert "acme gateway CA 2030-01-01" in ca.describe(info, now)
    assert "expires in 30 days: rotate" in ca.describe(info, now)
    assert "EXPIRED" in ca.describe(info, now + datetime.timedelta(days=31))
    with pytest.raises(ca.CaError):
        ca.build_ca("acme", 0, 2048)

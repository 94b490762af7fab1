"""`python -m sluicegate ca init|rotate|export|status`: the gateway CA in a mitmproxy confdir.

The gateway signs a certificate for every host an agent connects to with this CA, so every agent
host trusts it. The CA lives in mitmproxy's confdir layout (`mitmproxy-ca.pem` holds key and
certificate and is what mitmproxy loads; `mitmproxy-ca-cert.pem` is the certificate alone):

    CONFDIR/                 the active CA, loaded by the gateway at start-up
    CONFDIR/next/            a staged CA (`rotate stage`): trusted by agents, not used yet
    CONFDIR/retired/<id>/    CAs replaced by `rotate activate`: still trusted until `rotate finish`

Rotation never breaks an agent, because trust is always widened before the switch:

    ca rotate stage      create the next CA; `ca export` now includes it: distribute the bundle
    ca rotate activate   (once every agent host has the bundle) swap it in; restart the gateways
    ca rotate finish     (once every gateway runs the new CA) forget the old one; export again

`ca export` writes certificates only (active, next, retired), never a key.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

BASENAME: Final = "mitmproxy"
KEY_AND_CERT: Final = f"{BASENAME}-ca.pem"
CERT: Final = f"{BASENAME}-ca-cert.pem"
# Everything mitmproxy's own store holds, so tools that expect its layout find it.
FILES: Final = (
    KEY_AND_CERT,
    f"{BASENAME}-ca.p12",
    CERT,
    f"{BASENAME}-ca-cert.cer",
    f"{BASENAME}-ca-cert.p12",
    f"{BASENAME}-dhparam.pem",
)
NEXT: Final = "next"
RETIRED: Final = "retired"
DEFAULT_DAYS: Final = 3 * 365
DEFAULT_KEY_SIZE: Final = 3072
# Backdated like mitmproxy's own CA, so agents with a slightly slow clock accept it.
BACKDATE: Final = datetime.timedelta(days=2)
EXPIRY_WARNING: Final = datetime.timedelta(days=90)


class CaError(Exception):
    """A CA operation cannot proceed; the message says why and what to do."""


@dataclasses.dataclass(frozen=True)
class CaInfo:
    """One CA of a confdir and its role in the rotation."""

    role: str  # active | next | retired
    directory: Path
    cert: x509.Certificate

    @property
    def fingerprint(self) -> str:
        """SHA-256 over the DER certificate, as `openssl x509 -fingerprint -sha256` shows it."""
        return self.cert.fingerprint(hashes.SHA256()).hex(":").upper()

    @property
    def common_name(self) -> str:
        names = self.cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        return str(names[0].value) if names else self.cert.subject.rfc4514_string()

    @property
    def not_after(self) -> datetime.datetime:
        return self.cert.not_valid_after_utc

    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def build_ca(
    name: str, days: int, key_size: int, now: datetime.datetime | None = None
) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    """A CA key and self-signed certificate fit for mitmproxy.

    `path_length=0`: the gateway signs leaf certificates directly, never a sub-CA, so a stolen
    key cannot mint intermediates that outlive a rotation. The date in the name tells rotated
    CAs apart in trust stores.
    """
    if days <= 0:
        raise CaError("--days must be positive")
    now = now or _utcnow()
    key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, f"{name} gateway CA {now:%Y-%m-%d}"),
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sluicegate"),
        ]
    )
    usage = x509.KeyUsage(
        digital_signature=False,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=True,
        crl_sign=True,
        encipher_only=False,
        decipher_only=False,
    )
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage, critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def write_ca(directory: Path, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> None:
    """Write a CA in mitmproxy's confdir layout; the key-holding files are 0600.

    `mitmproxy-ca.pem` is written last: mitmproxy generates a CA of its own when that file is
    missing, so an interrupted write must not leave a directory it would half-use.
    """
    from mitmproxy.certs import DEFAULT_DHPARAM

    if (directory / KEY_AND_CERT).exists():
        raise CaError(f"{directory} already holds a CA ({KEY_AND_CERT})")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    cert_pem = cert.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    plain = serialization.NoEncryption()
    label = BASENAME.encode()
    contents = {
        f"{BASENAME}-ca.p12": (
            pkcs12.serialize_key_and_certificates(label, key, cert, None, plain),
            0o600,
        ),
        CERT: (cert_pem, 0o644),
        f"{BASENAME}-ca-cert.cer": (cert_pem, 0o644),
        f"{BASENAME}-ca-cert.p12": (
            pkcs12.serialize_key_and_certificates(label, None, cert, None, plain),
            0o644,
        ),
        f"{BASENAME}-dhparam.pem": (DEFAULT_DHPARAM, 0o644),
        KEY_AND_CERT: (key_pem + cert_pem, 0o600),
    }
    for file_name, (data, mode) in contents.items():
        _write_atomically(directory / file_name, data, mode)


def _write_atomically(path: Path, data: bytes, mode: int) -> None:
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def load_cert(directory: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate((directory / CERT).read_bytes())
    except (OSError, ValueError) as e:
        raise CaError(f"no readable CA certificate in {directory} ({type(e).__name__})") from None


def init(confdir: Path, name: str, days: int, key_size: int) -> CaInfo:
    """Create the first CA of a confdir; refuses to replace one (that is what `rotate` is for)."""
    if (confdir / KEY_AND_CERT).exists():
        raise CaError(
            f"{confdir} already has a CA; rotate it with `ca rotate stage` "
            "(replacing it in place would break every agent host at once)"
        )
    key, cert = build_ca(name, days, key_size)
    write_ca(confdir, key, cert)
    return CaInfo("active", confdir, cert)


def cas(confdir: Path) -> list[CaInfo]:
    """Every CA of a confdir: active first, then next, then retired (oldest first)."""
    if not (confdir / KEY_AND_CERT).exists():
        raise CaError(f"{confdir} has no CA; create one with `ca init --confdir {confdir}`")
    found = [CaInfo("active", confdir, load_cert(confdir))]
    if (confdir / NEXT / CERT).exists():
        found.append(CaInfo("next", confdir / NEXT, load_cert(confdir / NEXT)))
    retired = confdir / RETIRED
    if retired.is_dir():
        for directory in sorted(p for p in retired.iterdir() if p.is_dir()):
            found.append(CaInfo("retired", directory, load_cert(directory)))
    return found


def stage(confdir: Path, name: str, days: int, key_size: int) -> CaInfo:
    """Create the next CA beside the active one, for agents to trust before the switch."""
    cas(confdir)  # there must be an active CA to rotate from
    if (confdir / NEXT).exists():
        raise CaError(
            f"a next CA is already staged in {confdir / NEXT}: activate it "
            "(`ca rotate activate`) or delete that directory to stage another"
        )
    key, cert = build_ca(name, days, key_size)
    write_ca(confdir / NEXT, key, cert)
    return CaInfo("next", confdir / NEXT, cert)


def activate(confdir: Path, now: datetime.datetime | None = None) -> tuple[CaInfo, CaInfo]:
    """Swap the staged CA in; the old one moves to retired/ (still exported). -> (old, new)"""
    current = cas(confdir)[0]
    staged = confdir / NEXT
    missing = [name for name in FILES if not (staged / name).exists()]
    if not staged.is_dir() or missing:
        raise CaError(f"no complete staged CA in {staged}; run `ca rotate stage` first")
    now = now or _utcnow()
    short = current.fingerprint.replace(":", "")[:16].lower()
    retired = confdir / RETIRED / f"{now:%Y%m%dT%H%M%SZ}-{short}"
    retired.mkdir(mode=0o700, parents=True)
    for name in FILES:
        if (confdir / name).exists():
            os.replace(confdir / name, retired / name)
    # Key file last: while it is absent a starting mitmproxy would create a CA of its own.
    for name in (*FILES[1:], FILES[0]):
        os.replace(staged / name, confdir / name)
    shutil.rmtree(staged)
    return (
        CaInfo("retired", retired, current.cert),
        CaInfo("active", confdir, load_cert(confdir)),
    )


def finish(confdir: Path) -> list[CaInfo]:
    """Delete retired CAs (keys included): agents stop trusting them with the next export."""
    retired = [info for info in cas(confdir) if info.role == "retired"]
    for info in retired:
        shutil.rmtree(info.directory)
    return retired


def trust_bundle(confdir: Path) -> bytes:
    """The certificates agents must trust now: active, staged and retired CAs."""
    seen: set[str] = set()
    chunks = []
    for info in cas(confdir):
        if info.fingerprint not in seen:
            seen.add(info.fingerprint)
            chunks.append(info.pem())
    return b"".join(chunks)


def describe(info: CaInfo, now: datetime.datetime | None = None) -> str:
    now = now or _utcnow()
    left = info.not_after - now
    warning = ""
    if left <= datetime.timedelta(0):
        warning = "  EXPIRED"
    elif info.role == "active" and left < EXPIRY_WARNING:
        warning = f"  expires in {left.days} days: rotate"
    return (
        f"{info.role:8} {info.common_name}\n"
        f"         sha256 {info.fingerprint}\n"
        f"         valid until {info.not_after:%Y-%m-%d}{warning}  ({info.directory})"
    )


# -- command line ---------------------------------------------------------------------------------


def _add_creation_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", default="sluicegate", help="deployment name in the CA's name")
    parser.add_argument(
        "--days", type=int, default=DEFAULT_DAYS, help=f"validity (default {DEFAULT_DAYS})"
    )
    parser.add_argument(
        "--key-size",
        type=int,
        choices=(2048, 3072, 4096),
        default=DEFAULT_KEY_SIZE,
        help=f"RSA key size (default {DEFAULT_KEY_SIZE})",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sluicegate ca",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--confdir", required=True, type=Path, help="the gateway's mitmproxy confdir"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    init_parser = sub.add_parser("init", parents=[common], help="create the gateway CA")
    _add_creation_options(init_parser)
    rotate = sub.add_parser("rotate", parents=[common], help="stage, activate or finish")
    rotate.add_argument("step", choices=("stage", "activate", "finish"))
    _add_creation_options(rotate)
    export = sub.add_parser("export", parents=[common], help="certificates agents must trust")
    export.add_argument("--out", type=Path, help="write here (default: standard output)")
    sub.add_parser("status", parents=[common], help="the CAs of the confdir and their roles")
    return parser


def main(argv: Sequence[str]) -> int:
    args = build_parser().parse_args(list(argv))
    confdir: Path = args.confdir.expanduser().absolute()
    try:
        return _run(args, confdir)
    except CaError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"error: {e.filename or confdir}: {e.strerror}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace, confdir: Path) -> int:
    if args.command == "init":
        info = init(confdir, args.name, args.days, args.key_size)
        print(describe(info))
        print(f"\nAgents trust: {confdir / CERT}  (or `ca export --confdir {confdir}`)")
    elif args.command == "status":
        for info in cas(confdir):
            print(describe(info))
    elif args.command == "export":
        bundle = trust_bundle(confdir)
        if args.out is None:
            sys.stdout.buffer.write(bundle)
        else:
            _write_atomically(args.out, bundle, 0o644)
        for info in cas(confdir):
            print(f"exported {info.role:8} {info.fingerprint}  {info.common_name}", file=sys.stderr)
    elif args.step == "stage":
        info = stage(confdir, args.name, args.days, args.key_size)
        print(describe(info))
        print(
            "\nNext: `ca export` and distribute the bundle (it holds both CAs) to every agent "
            "host (rerun `agent-env` there); then `ca rotate activate` and restart the gateways."
        )
    elif args.step == "activate":
        old, new = activate(confdir)
        print(describe(new))
        print(describe(old))
        print(
            "\nRestart every gateway replica to serve the new CA. Agents still trust the old one "
            "until `ca rotate finish` and the next export."
        )
    else:
        removed = finish(confdir)
        for info in removed:
            print(f"removed  {info.fingerprint}  {info.common_name}")
        if not removed:
            print("no retired CA to remove")
        else:
            print("\nNext: `ca export` and distribute the bundle; it no longer holds the old CA.")
    return 0

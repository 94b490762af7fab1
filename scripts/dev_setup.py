"""Create the embedded default's local material under certs/ (idempotent).

- certs/mitmproxy/          the gateway CA (mitmproxy confdir, `ca init`); agents trust its export
- certs/dev-signing-key/   a local token-signing key (dev.private.pem) and its JWKS
- certs/secrets/           upstream credentials the gateway injects, one file each: taken from
                           OPENAI_API_KEY / ANTHROPIC_API_KEY when set, else a placeholder
- certs/recording/         the Ed25519 key that signs recorded sessions (signing.pem, .pub)
- certs/console/           the admin token of the approvals API and the web console (admin-token)
- certs/demo/              the demo upstream's CA and certificate (127.0.0.1), the trust bundle the
                           dev gateway verifies upstreams with (public CAs + the demo CA), and the
                           demo routes' fake upstream keys in certs/secrets/demo-*-api-key

Nothing here is for production: a production gateway uses the org's IdP (JWKS URL) and mounted
secrets, see docs/DEPLOYMENT.md.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
import sys
from pathlib import Path

import certifi
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "addons"))

from sluicegate.auth.devtokens import generate_signing_key  # noqa: E402
from sluicegate.cli import ca  # noqa: E402
from sluicegate.recording.chain import Signer  # noqa: E402

CERTS = REPO / "certs"
SECRETS = {
    "openai-api-key": "OPENAI_API_KEY",
    "anthropic-api-key": "ANTHROPIC_API_KEY",
}


def ensure_ca(confdir: Path) -> Path:
    """`python -m sluicegate ca init` unless there is a CA (an older checkout's is kept)."""
    if not (confdir / ca.KEY_AND_CERT).exists():
        ca.init(confdir, "sluicegate-dev", ca.DEFAULT_DAYS, ca.DEFAULT_KEY_SIZE)
    return confdir / ca.CERT


def ensure_signing_key(directory: Path) -> Path:
    private = directory / "dev.private.pem"
    if not private.exists():
        generate_signing_key(directory, "dev")
    return private


def ensure_recording_key(directory: Path) -> Path:
    """The key that signs session hash chains; `sessions verify` checks against signing.pem.pub."""
    private = directory / "signing.pem"
    if not private.exists():
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        signer = Signer.generate()
        fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(signer.private_pem())
        (directory / "signing.pem.pub").write_bytes(signer.public_pem())
    return private


def ensure_admin_token(directory: Path) -> Path:
    """The control listener's admin token (approvals CLI, console sign-in); random, 0600."""
    path = directory / "admin-token"
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(32) + "\n")
    return path


def ensure_secrets(directory: Path) -> list[str]:
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    placeholders = []
    for name, env in SECRETS.items():
        path = directory / name
        value = os.environ.get(env, "").strip()
        if value:
            path.write_text(value + "\n")
        elif not path.exists():
            path.write_text(f"placeholder-{name}-replace-me\n")
        if path.read_text().startswith("placeholder-"):
            placeholders.append(f"{path} (set {env} and rerun, or write the key into the file)")
        path.chmod(0o600)
    return placeholders


DEMO_HOST = "127.0.0.1"


def _private_file(path: Path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def ensure_demo(directory: Path, secrets_dir: Path) -> Path:
    """The demo upstream's own CA and a certificate for 127.0.0.1 it signs; the trust bundle the
    dev gateway verifies upstreams with (certifi's public CAs + the demo CA: mitmproxy's
    `ssl_verify_upstream_trusted_ca` replaces its default trust store, it does not add to it);
    and the fake upstream keys the demo routes inject."""
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    for name in ("demo-openai-api-key", "demo-anthropic-api-key"):
        path = secrets_dir / name
        if not path.exists():
            _private_file(path, f"sk-demo-{secrets.token_urlsafe(30)}\n".encode())
    trust = directory / "upstream-trust.pem"
    if (directory / "upstream-cert.pem").exists() and trust.exists():
        return trust
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sluicegate demo upstream CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, DEMO_HOST)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=825))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(DEMO_HOST))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    ca_pem = ca_cert.public_bytes(pem)
    (directory / "ca.pem").write_bytes(ca_pem)
    _private_file(
        directory / "upstream-key.pem",
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
    )
    (directory / "upstream-cert.pem").write_bytes(cert.public_bytes(pem))
    public = Path(certifi.where()).read_bytes().rstrip(b"\n") + b"\n"
    trust.write_bytes(public + b"# sluicegate demo upstream CA\n" + ca_pem)
    return trust


def main() -> int:
    ca = ensure_ca(CERTS / "mitmproxy")
    key = ensure_signing_key(CERTS / "dev-signing-key")
    placeholders = ensure_secrets(CERTS / "secrets")
    recording_key = ensure_recording_key(CERTS / "recording")
    admin_token = ensure_admin_token(CERTS / "console")
    demo_trust = ensure_demo(CERTS / "demo", CERTS / "secrets")
    print(f"gateway CA:        {ca}")
    print(f"dev signing key:   {key}")
    print(f"recording key:     {recording_key}")
    print(f"console token:     {admin_token} (http://127.0.0.1:8790/console/)")
    print(f"upstream trust:    {demo_trust} (public CAs + the demo upstream's CA)")
    for line in placeholders:
        print(f"placeholder key:   {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Create the embedded default's local material under certs/ (idempotent).

- certs/mitmproxy/          the gateway CA (mitmproxy confdir, `ca init`); agents trust its export
- certs/dev-signing-key/   a local token-signing key (dev.private.pem) and its JWKS
- certs/secrets/           upstream credentials the gateway injects, one file each: taken from
                           OPENAI_API_KEY / ANTHROPIC_API_KEY when set, else a placeholder
- certs/recording/         the Ed25519 key that signs recorded sessions (signing.pem, .pub)
- certs/console/           the admin token of the approvals API and the web console (admin-token)

Nothing here is for production: a production gateway uses the org's IdP (JWKS URL) and mounted
secrets, see docs/DEPLOYMENT.md.
"""

from __future__ import annotations

import os
import secrets
import sys
from pathlib import Path

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


def main() -> int:
    ca = ensure_ca(CERTS / "mitmproxy")
    key = ensure_signing_key(CERTS / "dev-signing-key")
    placeholders = ensure_secrets(CERTS / "secrets")
    recording_key = ensure_recording_key(CERTS / "recording")
    admin_token = ensure_admin_token(CERTS / "console")
    print(f"gateway CA:        {ca}")
    print(f"dev signing key:   {key}")
    print(f"recording key:     {recording_key}")
    print(f"console token:     {admin_token} (http://127.0.0.1:8790/console/)")
    for line in placeholders:
        print(f"placeholder key:   {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

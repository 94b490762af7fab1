"""`python -m sluicegate mint-token --config PATH --sub NAME --groups a,b`: a dev caller token.

Signs with the local dev key (made by the dev setup script) for the config's first issuer and
audience, then verifies the token with the config's own keys, so a key the gateway does not trust
is reported here rather than as a 401 later. Refuses unless `gateway.environment` is
`development`: production tokens come from the IdP. Only the `gateway` and `auth` sections are
read (strictly), so minting does not need the routes' secrets in the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from sluicegate import config as config_mod
from sluicegate.auth import devtokens
from sluicegate.auth.verifier import TokenRejected
from sluicegate.config.schema import ConfigError, Parser, Problem, read_yaml

DEFAULT_KEY = config_mod.REPO_DIR / "certs" / "dev-signing-key" / "dev.private.pem"
PRIVATE_KEY_SUFFIX = ".private.pem"


def load_sections(path: Path) -> tuple[config_mod.GatewaySection, config_mod.AuthSection]:
    """The `gateway` and `auth` sections of a config file, validated as the gateway would."""
    path = path.expanduser().resolve()
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError([Problem(str(path), "", "must be a mapping")])
    parser = Parser(path)
    gateway = parser.parse(config_mod.GatewaySection, data.get("gateway", {}), "gateway")
    auth = None
    if "auth" in data:
        auth = parser.parse(config_mod.AuthSection, data["auth"], "auth")
    else:
        parser.problem("auth", "required key is missing")
    if parser.problems or gateway is None or auth is None:
        raise ConfigError(parser.problems)
    return gateway, auth


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sluicegate mint-token", description=__doc__)
    parser.add_argument("--config", required=True, type=Path, help="gateway config file")
    parser.add_argument(
        "--key", type=Path, default=DEFAULT_KEY, help=f"dev private key (default: {DEFAULT_KEY})"
    )
    parser.add_argument(
        "--kid", help=f"key id (default: the key file name without {PRIVATE_KEY_SUFFIX})"
    )
    parser.add_argument("--sub", required=True, help="subject: who the token speaks for")
    parser.add_argument("--groups", default="", help="comma-separated groups, e.g. agents,ops")
    parser.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds (default 3600)")
    args = parser.parse_args(argv)

    try:
        gateway, auth = load_sections(args.config)
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 1
    if gateway.environment != "development":
        print(
            f"error: {args.config}: gateway.environment is {gateway.environment!r}; dev tokens "
            "are only minted for a `development` config (production tokens come from the IdP)",
            file=sys.stderr,
        )
        return 1
    if args.ttl <= 0:
        print("error: --ttl must be positive", file=sys.stderr)
        return 1
    kid = args.kid or args.key.name.removesuffix(PRIVATE_KEY_SUFFIX)
    groups = [g.strip() for g in args.groups.split(",") if g.strip()]
    try:
        pem = args.key.read_bytes()
    except OSError as e:
        print(
            f"error: cannot read the dev key {args.key} ({e.strerror}); "
            "run the dev setup script first",
            file=sys.stderr,
        )
        return 1
    try:
        token = devtokens.mint_token(
            pem,
            kid,
            subject=args.sub,
            groups=groups,
            issuer=auth.issuers[0],
            audience=auth.audiences[0],
            ttl_seconds=args.ttl,
            groups_claim=auth.groups_claim,
        )
    except ValueError as e:  # not a usable private key; the message names no key material
        print(f"error: {args.key}: {e}", file=sys.stderr)
        return 1
    try:
        asyncio.run(config_mod.build_verifier(auth).averify(token))
    except TokenRejected as e:
        print(
            f"error: the gateway would reject this token ({e.reason}): is {args.key} "
            f"(kid {kid!r}) one of the config's auth.keys?",
            file=sys.stderr,
        )
        return 1
    print(token)
    return 0

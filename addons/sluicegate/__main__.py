"""`python -m sluicegate <command> ...`: one entry point for every operator tool.

Each command lives in its own module under `sluicegate.cli` and exposes `main(argv) -> int`;
modules are imported lazily so a tool never pays for (or breaks on) another tool's imports.
"""

from __future__ import annotations

import importlib
import sys

# command -> (module, one-line help). `rules test` is dispatched as `rules` with argv ["test", ...].
COMMANDS: dict[str, tuple[str, str]] = {
    "agent-env": ("sluicegate.cli.agent_env", "print the environment an agent host needs"),
    "approvals": ("sluicegate.cli.approvals", "list, approve or deny flows held by policy"),
    "ca": ("sluicegate.cli.ca", "gateway CA: init, rotate (stage/activate/finish), export"),
    "check-config": ("sluicegate.cli.check_config", "validate a gateway config file"),
    "config-reference": (
        "sluicegate.cli.config_reference",
        "print the config reference (Markdown), generated from the schema",
    ),
    "demo": (
        "sluicegate.cli.demo",
        "send fake secrets through the dev gateway to its demo upstream and show what happened",
    ),
    "doctor": ("sluicegate.cli.doctor", "check an agent host: proxy, CA trust, token, bypass"),
    "mint-token": ("sluicegate.cli.mint_token", "mint a caller token with the dev key (dev only)"),
    "redact": ("sluicegate.cli.redact", "redact a body or JSON-lines file with the rule pack"),
    "rules": ("sluicegate.cli.rules", "rule pack tools (`rules test` runs every rule's examples)"),
    "sessions": ("sluicegate.cli.sessions", "recorded sessions: list, flows, show, verify, unseal"),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: python -m sluicegate <command> [args...]", "", "commands:"]
    lines += [f"  {name.ljust(width)}  {text}" for name, (_, text) in sorted(COMMANDS.items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, rest = args[0], args[1:]
    if command not in COMMANDS:
        print(f"sluicegate: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())

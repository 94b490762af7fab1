"""`python -m sluicegate check-config PATH`: validate a config file as the gateway would."""

from __future__ import annotations

import argparse
import sys

from sluicegate.config import ConfigError, load_config


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sluicegate check-config", description=__doc__)
    parser.add_argument("path", help="config file to validate")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.path)
    except ConfigError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"{len(e.problems)} problem(s) found", file=sys.stderr)
        return 1
    print(f"{config.source}: OK ({len(config.routes)} route(s))")
    return 0

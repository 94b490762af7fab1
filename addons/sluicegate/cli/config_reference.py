"""`python -m sluicegate config-reference`: the config reference, generated from the schema.

The README's "Configuration reference" section is this output (a test keeps them equal), so the
documentation of every key comes from the same code that validates it.

    python -m sluicegate config-reference            # print Markdown
    python -m sluicegate config-reference --write README.md   # refresh the README section
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sluicegate.config import REPO_DIR, Config, schema

BEGIN = "<!-- BEGIN config-reference (generated: python -m sluicegate config-reference) -->"
END = "<!-- END config-reference -->"


def render() -> str:
    lines = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for key, type_text, default, doc in schema.reference(Config):
        default = default.replace(str(REPO_DIR), "<repo>")
        cells = [f"`{key}`", type_text, f"`{default}`" if default != "required" else "required"]
        cells.append(" ".join(doc.split()))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def replace_section(text: str, generated: str) -> str:
    start, end = text.index(BEGIN), text.index(END)
    return text[: start + len(BEGIN)] + "\n" + generated + text[end:]


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m sluicegate config-reference")
    parser.add_argument("--write", type=Path, help="replace the generated section of this file")
    args = parser.parse_args(argv)
    generated = render()
    if args.write is None:
        sys.stdout.write(generated)
        return 0
    text = args.write.read_text()
    try:
        updated = replace_section(text, generated)
    except ValueError:
        print(f"{args.write}: no {BEGIN!r} / {END!r} markers", file=sys.stderr)
        return 1
    args.write.write_text(updated)
    return 0

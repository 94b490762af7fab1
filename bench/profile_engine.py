"""Where the redaction engine's time goes on the README's two JSON corpora, in process.

    python -m bench profile_engine [--mb 1] [--profile default] [--top 20]

Runs the buffered path (`redact_body`, as the gateway redacts a JSON request body) over the
agent payloads and the JSON documents of many small strings of `python -m bench readme` under
cProfile, and prints each corpus's MB/s (CPU time, profiled: slower than the README's figure)
and the functions with the most own time, as a share of the total.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from bench.lib import ROOT
from bench.readme import agent_payloads, small_string_documents
from sluicegate.redaction.bodies import BodyPolicy, redact_body
from sluicegate.redaction.redactor import Redactor
from sluicegate.redaction.rules import Direction, load_rule_pack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=1.0)
    parser.add_argument("--profile", default="default")
    parser.add_argument("--top", type=int, default=20)
    args = parser.parse_args(argv)
    redactor = Redactor(load_rule_pack([ROOT / "rules"], args.profile), Direction.REQUEST)
    policy = BodyPolicy()
    for label, docs in (
        ("agent JSON payloads", agent_payloads(args.mb)),
        ("JSON of many small strings", small_string_documents(args.mb)),
    ):
        for doc in docs[:2]:  # warm the caches the engine keeps per process
            redact_body(doc, "application/json", redactor, policy)
        profile = cProfile.Profile(time.process_time)
        start = time.process_time()
        profile.enable()
        for doc in docs:
            redact_body(doc, "application/json", redactor, policy)
        profile.disable()
        seconds = time.process_time() - start
        size = sum(len(d) for d in docs) / 1e6
        stats = pstats.Stats(profile)
        raw = stats.stats  # type: ignore[attr-defined]
        total = sum(v[2] for v in raw.values())
        rows = sorted(
            ((v[2], f"{k[0].split('/addons/')[-1]}:{k[1]}({k[2]})") for k, v in raw.items()),
            reverse=True,
        )
        print(f"\n{label}, `{args.profile}` profile: {size:.1f} MB, {size / seconds:.1f} MB/s "
              "(CPU, profiled)")  # fmt: skip
        for own, where in rows[: args.top]:
            print(f"  {own / total:6.1%}  {where}")
    return 0

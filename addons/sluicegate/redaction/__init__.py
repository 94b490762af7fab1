"""Redaction engines: rule files, whole-text and streamed redaction, bodies, JSON.

Importing the package imports the redactor, which registers the stream-soundness check that
`rules.load_rule_set` runs on every rule (the redactor builds on `rules`, so `rules` cannot
import it).
"""

from sluicegate.redaction import redactor as _redactor  # noqa: F401

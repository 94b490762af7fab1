"""The README stays true: its config reference is the schema's."""

from __future__ import annotations

from sluicegate.cli import config_reference
from sluicegate.config import REPO_DIR


def test_readme_config_reference_matches_the_schema() -> None:
    readme = (REPO_DIR / "README.md").read_text()
    expected = config_reference.replace_section(readme, config_reference.render())
    assert readme == expected, (
        "README.md's configuration reference is stale: "
        "run `python -m sluicegate config-reference --write README.md`"
    )

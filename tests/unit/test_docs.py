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


def test_readme_shows_the_console_and_every_screenshot_it_links_exists() -> None:
    import re
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    readme = (repo / "README.md").read_text()
    shots = re.findall(r"\(docs/(console-[a-z]+\.png)\)", readme)
    assert "![" in readme and "docs/console-approvals.png" in readme
    assert {"console-approvals.png", "console-activity.png", "console-flow.png"} <= set(shots)
    for name in shots:
        assert (repo / "docs" / name).read_bytes().startswith(b"\x89PNG"), name
    assert (repo / "scripts" / "console_screenshots.py").exists()

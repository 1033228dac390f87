"""The docs stay true: every setting is in docs/configuration.md's table, and CI runs the README's test command."""

from __future__ import annotations

from service.config import Settings
from tests.conftest import REPO


def test_every_setting_is_documented_with_its_env_name() -> None:
    table = (REPO / "docs" / "configuration.md").read_text()
    for name in Settings.model_fields:
        assert f"| `{name}` | `DENSE_{name.upper()}` |" in table, f"setting {name} missing from docs/configuration.md"


def test_ci_runs_the_readme_test_command() -> None:
    readme = (REPO / "README.md").read_text()
    ci = (REPO / ".ci" / "run").read_text()
    assert "make test" in readme and "make run" in readme
    commands = [line for line in ci.splitlines() if line and not line.startswith(("#", "set ", "cd "))]
    assert commands[-1] == "make test"
    # Before it only the installs of tools CI can add (Debian packages); no other test command.
    setup = "\n".join(commands[:-1])
    assert "pytest" not in setup and "make" not in setup, commands
    assert "apt-get install" in setup and "prometheus" in setup and "chromium" in setup, commands


def test_readme_stays_a_newcomers_page_and_links_every_docs_page() -> None:
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 350, "README.md is for newcomers: move detail into a docs/ page"
    unlinked = [p.name for p in sorted((REPO / "docs").glob("*.md")) if f"](docs/{p.name})" not in readme]
    assert not unlinked, f"README.md's documentation table does not link {unlinked}"

"""Shared CLI assertions: a bad input fails with exit 2 and exactly one ``error:`` line, no traceback."""

from __future__ import annotations

from typing import Any, Sequence

from click.testing import CliRunner

from dsrewrite.cli import main


def run_cli(args: Sequence[Any]) -> Any:
    """Invoke ``dsrewrite`` in-process with every argument as a string."""
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def assert_clean_cli_error(label: str, r: Any, fragments: Sequence[str]) -> None:
    """Exit 2, no traceback, one stderr line starting ``error: `` holding every fragment (case-insensitive);
    ``warning:`` lines aside."""
    assert r.exit_code == 2, f"{label}: exit {r.exit_code}\n{r.output}"
    assert "Traceback" not in r.output, f"{label}: {r.output}"
    # a "warning:" line may come first (e.g. what --trust-pickle does); the failure itself is one line
    lines = [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), f"{label}: not one error line: {r.stderr!r}"
    for frag in fragments:
        assert frag.lower() in lines[0].lower(), f"{label}: {frag!r} not in {lines[0]!r}"

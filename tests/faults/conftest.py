"""The fault table, printed after the run (CI keeps the test output)."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.faults.rig import table
    from tests.faults.test_faults import ROWS

    if ROWS:
        terminalreporter.write_sep("=", "fault table (tests/faults)")
        terminalreporter.write_line(table(ROWS))

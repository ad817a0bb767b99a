"""pytest plugin for the budgeted GPU check: print each failure's traceback the moment it happens.

pytest prints tracebacks only in its end-of-run summary, which a stage killed by its timeout never
reaches (the first H200 run came back with rows of 'F' and no names). Loaded with
``-p live_failures`` (bench/ on PYTHONPATH)."""

from __future__ import annotations


def pytest_runtest_logreport(report):
    if not report.failed:
        return
    text = report.longreprtext
    if len(text) > 4000:
        text = "...\n" + text[-4000:]
    # Straight to the log: the terminal reporter buffers the '.F' progress line.
    print(f"\n----- FAILED {report.nodeid} ({report.when}) -----\n{text}\n-----", flush=True)

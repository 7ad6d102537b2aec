"""pytest plugin for the GPU machine: each failure's report is appended to ``$XATTN_FAILS_FILE``
the moment it happens, so a test run cut by its time limit still says which tests failed and
why (pytest's own summary is printed only at the end). Load it with ``-p pytest_failures_now``
and ``tools`` on ``PYTHONPATH`` (``.ci/gpu_run.sh`` does)."""

import os


def pytest_runtest_logreport(report):
    path = os.environ.get("XATTN_FAILS_FILE")
    if report.failed and path:
        with open(path, "a") as f:
            f.write(f"== {report.nodeid} ({report.when})\n{str(report.longrepr)[-1500:]}\n")

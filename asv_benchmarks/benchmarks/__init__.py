"""asv benchmarks for xattn (one module per area; see asv_benchmarks/asv.conf.json).

CI runs every benchmark once as a smoke test (``asv run --quick``) with ``XATTN_ASV_SMOKE=1``
in the environment; parameter grids chosen through :func:`sizes` then shrink to their small
end, so the smoke run checks that each benchmark works without spending minutes on large
problems. Real measurements leave the variable unset.
"""

import os

#: True in CI's smoke run: use the small sizes only.
SMOKE = os.environ.get("XATTN_ASV_SMOKE", "") not in ("", "0")


def sizes(full, smoke):
    """Parameter values: ``smoke`` in the CI smoke run, ``full`` otherwise."""
    return list(smoke) if SMOKE else list(full)

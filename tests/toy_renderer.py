"""A toy report format that only the tests register: ``.csv``, one row per plan layer.

Everything here uses the public report records only: the point of the test is that a
new format needs this one file and no change to the package.
"""

from __future__ import annotations

import csv
import io

from dsrewrite.report import Report

COLUMNS = ("layer", "action", "params_before", "params_after", "macs_before", "macs_after")


class CsvRenderer:
    """``.csv``: per-layer params and MACs before and after, with a header row."""

    suffix, description = ".csv", "CSV, one row per plan layer"

    def render(self, report: Report) -> str:
        buf = io.StringIO()
        out = csv.writer(buf, lineterminator="\n")
        out.writerow(COLUMNS)
        for r in report.layers:
            out.writerow((r.name, "replace" if r.replaced else "skip", r.before.params, r.after.params,
                          r.before.macs, r.after.macs))
        return buf.getvalue()

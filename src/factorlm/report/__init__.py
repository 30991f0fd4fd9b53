"""Compression reports: the :class:`Report` schema, markdown / JSON / PNG rendering, comparison."""

from factorlm.report.render import (
    compare_reports,
    format_markdown,
    load_report,
    summary_table,
    write_report,
)
from factorlm.report.schema import BlockRecord, ModuleRecord, Report

__all__ = [
    "BlockRecord",
    "ModuleRecord",
    "Report",
    "compare_reports",
    "format_markdown",
    "load_report",
    "summary_table",
    "write_report",
]

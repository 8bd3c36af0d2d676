"""HTML reports with inline SVG plots: training and federated runs, patches, merges and benchmark studies."""

from patchlm.report.page import build_report, sections_for, write_report

__all__ = ["build_report", "sections_for", "write_report"]

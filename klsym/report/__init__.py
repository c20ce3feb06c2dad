"""Report: published tables with provenance, comparison tables and the HTML report builder."""

"""Command-line tools: the batch CLI (``predict``) and the reviewer report's plots."""

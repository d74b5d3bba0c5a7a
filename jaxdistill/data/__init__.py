"""Data: record sources, grain pipelines, tokenisation, built-in workloads."""

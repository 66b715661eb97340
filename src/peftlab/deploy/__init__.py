"""Putting trained runs to use: serving adapters over HTTP, merging, exporting to GGUF."""

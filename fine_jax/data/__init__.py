"""Data sources, text and image processing, and grain pipelines."""

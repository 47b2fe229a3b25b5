"""Retrieval evaluation protocols."""

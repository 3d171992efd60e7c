"""Experiment grids (one fit + evaluation per run, resumable) and the report that compares them."""

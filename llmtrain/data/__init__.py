"""Data: reading sources, tokenizing into splits, and batch sources for the objectives."""

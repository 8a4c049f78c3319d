"""Efficiency tools (Menghani 2021): profile a model's footprint; compression and the Pareto plot are to come."""

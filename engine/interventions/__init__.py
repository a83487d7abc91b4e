"""Interventions: specs -> directions, edits (one compile function per op) -> hooks -> generation, sweeps -> demos.

May import engine.core, lens, data, sae and features; never geometry, cli or the app (layering:
core <- lens, data <- geometry, sae <- features <- interventions <- cli; lower layers never import higher ones).
"""

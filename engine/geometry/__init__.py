"""Concept-space geometry: point clouds and PCA/UMAP projections (projections.py), spread and isotropy per
layer (spread.py), linear probes per layer with concept-grouped folds (probes.py). May import engine.core,
engine.data and engine.lens; layering: core <- lens, data <- geometry, sae <- features <- interventions <- cli.
"""

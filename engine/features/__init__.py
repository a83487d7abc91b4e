"""SAE feature dashboards: the one-pass accumulator, building, reading, the feature map, activations on text.

Layering: core <- lens, data <- geometry, sae <- features <- interventions <- cli. This package may import
engine.core, lens, data, geometry and sae; it never imports interventions, cli or the UI (lower never import higher).
"""

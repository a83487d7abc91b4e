"""Core: loading models (models, tiny, devices), their anatomy, the site registry, capture and the self-check,
errors, file and numeric helpers. Core imports nothing from higher packages; the layering is
core <- lens, data <- geometry, sae <- features <- interventions <- cli."""

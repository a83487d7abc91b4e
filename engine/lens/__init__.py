"""Lenses: the logit lens (logit.py), tokens as the model writes them in context (tokens.py), the tuned lens
(tuned.py: module and files; tuned_data.py, tuned_train.py: training; compare.py: logit vs tuned) and the
latent-language measurement. May import engine.core and engine.data (windows, prompt sets, corpora) only;
layering: core <- lens, data <- geometry, sae <- features <- interventions <- cli (lower never import higher).
"""

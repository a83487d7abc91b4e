"""Automatic interpretability of SAE features (no Streamlit): explanations written by a language model,
scored by detection and fuzzing, cheap labels without any model, and search over them.

- :mod:`engine.autointerp.examples`  a feature's contexts from its dashboard, held-out split for scoring
- :mod:`engine.autointerp.prompts`   explainer and scorer prompts, answer parsing, prompt hashes
- :mod:`engine.autointerp.backends`  chat backends: a local HF chat model, any OpenAI-compatible endpoint
- :mod:`engine.autointerp.explain`   ``explanations.parquet``, incremental and resumable
- :mod:`engine.autointerp.scoring`   detection and fuzzing scores, ``scores.parquet``
- :mod:`engine.autointerp.labels`    token / n-gram / logit labels for every feature, ``labels.parquet``
- :mod:`engine.autointerp.search`    text search over explanations and labels; features like a text
- :mod:`engine.autointerp.jobs`      plain job functions (``params``, ``progress``, ``should_stop``)
"""

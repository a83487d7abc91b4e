"""Data: corpora and prompt sets, text windows (windows.py), activation stores (store.py reads,
store_writer.py writes, resumes and extends, store_admin.py verifies and deletes). May import engine.core only;
layering: core <- lens, data <- geometry, sae <- features <- interventions <- cli (lower never import higher).
"""

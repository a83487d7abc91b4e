"""Sparse autoencoders and transcoders: one class per architecture (base.py registry), SAELens and Gemma Scope
files (io.py), splicing, evaluation and training. May import engine.core and engine.data only.
"""

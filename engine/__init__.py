"""Latent Explorer engine: all computation, no UI imports."""
__version__ = "0.1.0"

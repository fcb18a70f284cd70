"""Gymnasium environments over a ``dpbert_rl`` model (layer skipping as sequential decisions).

Importing this package must not load BERT: environments are registered with string entry points.
"""

"""sds_exp: Sparse-Dense-Sparse pruning of pre-trained language models (arXiv 2408.10473)."""

__version__ = "0.1.0"

"""Evaluation: paper-protocol perplexity, measured sparsity, zero-shot through lm-eval."""

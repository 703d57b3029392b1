"""One-shot pruners (magnitude, Wanda, SparseGPT) and the pure mask functions they share."""

"""One-shot pruners (magnitude, Wanda, SparseGPT, RIA, ADMM, DSnoT, Pruner-Zero) and the pure mask functions they
share; docs/pruners.md says how to add one."""

"""Experiment tracking: ``tracker`` (NullTracker, WandbTracker) mirrors what metrics.json holds.

Named ``tracking`` rather than ``logging`` so the stdlib module is never shadowed. Nothing is
imported here, so ``import sds_exp.tracking`` never pulls in wandb.
"""

"""sds_exp's Hydra launcher plugins (Hydra discovers plugins only inside the ``hydra_plugins`` namespace)."""

"""`hydra/launcher=ray_sae`: each sweep member as a Ray task (see ray_sae_launcher.py)."""

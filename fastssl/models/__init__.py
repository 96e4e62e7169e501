"""Models: the multi-view masked autoencoder and its baselines (fastssl.models.mvmae)."""

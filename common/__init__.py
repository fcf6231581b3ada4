"""Pieces every stage shares: configs, layers, checkpoints, data, images, EMA."""

"""Pipelines chain the text encoder, a generator and the autoencoder's decoder."""

"""Stage 2b: an autoregressive transformer prior over the autoencoder's code indices.

Modules:

- ``prior.transformer``: the GPT over code indices, its config, conditions, prefixes and KV cache.
- ``prior.sampling``: token sampling with classifier-free guidance and logit filters (SamplingConfig).
- ``prior.text``: the text encoder of text priors, and fitting its states to the prior's text slots.
- ``prior.token_cache``: a dataset encoded to code indices once, so training never runs the encoder.
- ``prior.losses``: next-token cross-entropy on corrupted inputs, with condition dropout.
- ``prior.token_prior``: the bundle (autoencoder + GPT + text encoder config) that saves and loads a
  pipeline directory; :class:`pipelines.TokensToImage` runs it.
- ``prior.maskgit``: MaskGIT, the bidirectional transformer with a mask token, and its masked-token loss.
- ``prior.maskgit_sampling``: MaskGIT's parallel decoding (cosine schedule, Gumbel-annealed confidence,
  fixed tokens, guidance in one batch).
- ``prior.train``: the training script; ``prior.evaluate_shapes``: scores a shapes prior.
- ``prior.convert``: imports taming-transformers' Net2NetTransformer checkpoints (GPT + VQ-GAN) as a pipeline.
"""
from prior.sampling import SamplingConfig, filter_logits, sample_tokens
from prior.token_prior import TokenPrior
from prior.transformer import GPT, Condition, KVCache, Prefix, PriorConfig

__all__ = [
    "Condition",
    "GPT",
    "KVCache",
    "Prefix",
    "PriorConfig",
    "SamplingConfig",
    "TokenPrior",
    "filter_logits",
    "sample_tokens",
]

"""Stage 2b: an autoregressive transformer prior over the autoencoder's code indices."""
from prior.generate import TokenPrior
from prior.sampling import SamplingConfig, filter_logits, sample_tokens
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

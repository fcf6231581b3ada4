"""Vector quantization: nearest-code lookup, straight-through gradient, and codebook health.

Shape vocabulary: B batch, D code width, h w latent grid, N = B*h*w vectors, K codebook size.

Loss (van den Oord et al. 2017, eq. 3, with beta where the paper puts it)::

    loss = ||sg[z_e] - e||^2  +  beta * ||z_e - sg[e]||^2
           codebook term          commitment term

The codebook term moves the codes toward the encoder outputs and reaches only the codebook; the
commitment term keeps the encoder near its codes and reaches only the encoder. taming-transformers and
diffusers put beta on the codebook term instead (their ``legacy=True``). Imported weights give the same
``z_q`` and indices here as there; only the training loss differs. With EMA updates the codebook term is
dropped, because the codes then follow running averages instead of gradients.

Usage statistic: every code remembers the last training step (batch) it was assigned to;
``usage`` is the fraction of codes assigned within the last ``usage_window`` training steps. In eval
mode nothing is recorded and ``usage`` is the fraction of codes used by the current batch alone.

Distributed training: when ``torch.distributed`` is initialised, code counts (and EMA sums) are summed
over processes, and k-means centroids and restarted codes are broadcast from rank 0, so every process
holds the same codebook.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn


@dataclass(frozen=True)
class QuantizerConfig:
    """Options of :class:`VectorQuantizer`; all health options off gives taming's classic quantizer.

    Attributes:
        codebook_size: K, the number of codes.
        code_dim: D, the width of one code.
        beta: weight of the commitment term.
        l2_normalize: look up l2-normalised vectors among l2-normalised codes (cosine similarity,
            ViT-VQGAN); ``z_q`` is then unit-norm.
        kmeans_init: replace the codebook by k-means centroids of the first training batch, once.
        kmeans_iters: Lloyd iterations for that k-means (0: centroids are random batch vectors).
        dead_code_threshold: reset codes unused for this many training steps to random vectors of the
            current batch (0: off).
        usage_window: the number of recent training steps ``usage`` looks back over.
        ema_decay: update codes as exponential moving averages of their assigned vectors (0: off,
            codes learn from the codebook term instead).
        ema_eps: Laplace smoothing of the EMA cluster sizes, so rarely used codes do not divide by zero.
    """

    codebook_size: int = 1024
    code_dim: int = 8
    beta: float = 0.25
    l2_normalize: bool = False
    kmeans_init: bool = False
    kmeans_iters: int = 10
    dead_code_threshold: int = 0
    usage_window: int = 100
    ema_decay: float = 0.0
    ema_eps: float = 1e-5


class QuantizerOutput(NamedTuple):
    """What :meth:`VectorQuantizer.forward` returns.

    Attributes:
        z_q: (B, D, h, w) fp32 quantized latents; the forward value is the code, the gradient passes
            straight through to ``z_e``.
        indices: (B, h, w) int64 code indices in [0, K).
        loss: () codebook term + beta * commitment term (commitment term only with EMA updates).
        perplexity: () exp(entropy) of this batch's code histogram, in [1, min(K, N)]; logging only.
        usage: () fraction of codes used over the recent window (see the module docstring), in [0, 1].
    """

    z_q: Tensor
    indices: Tensor
    loss: Tensor
    perplexity: Tensor
    usage: Tensor


def squared_distances(vectors: Tensor, codebook: Tensor) -> Tensor:
    """Squared Euclidean distances (N, D), (K, D) -> (N, K).

    Expanded as |z|^2 + |e|^2 - 2 z.e, exactly as taming-transformers computes it, so that the argmin
    (and its tie-breaking) of imported models is reproduced bit for bit.
    """
    return (vectors.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1)
            - 2 * torch.matmul(vectors, codebook.t()))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _all_reduce_sum(tensor: Tensor) -> Tensor:
    if _distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _broadcast_from_rank0(tensor: Tensor) -> Tensor:
    if _distributed():
        dist.broadcast(tensor, src=0)
    return tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with optional k-means init, dead-code restart and EMA codes.

    The math runs in fp32 even under autocast. State that training changes (the step counter, the
    per-code last-used step, the k-means flag, EMA statistics) lives in buffers, so it is saved,
    restored on resume, and never changed in eval mode.

    Args:
        config: the quantizer options.
    """

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        self.config = config
        size, dim = config.codebook_size, config.code_dim
        # taming's initialisation, so a plain quantizer starts where the anchors start.
        codebook = torch.empty(size, dim).uniform_(-1.0 / size, 1.0 / size)
        if self.uses_ema:
            self.register_buffer("codebook", codebook)
            self.register_buffer("ema_cluster_size", torch.ones(size))
            self.register_buffer("ema_embed_sum", codebook.clone())
        else:
            self.codebook = nn.Parameter(codebook)
        self.register_buffer("initialized", torch.tensor(not config.kmeans_init))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("last_used", torch.zeros(size, dtype=torch.long))

    @property
    def uses_ema(self) -> bool:
        return self.config.ema_decay > 0

    def normalized_codebook(self) -> Tensor:
        """(K, D) codes as the lookup sees them (unit-norm with ``l2_normalize``)."""
        return F.normalize(self.codebook, dim=1) if self.config.l2_normalize else self.codebook

    def forward(self, z_e: Tensor) -> QuantizerOutput:
        """Quantize encoder outputs (B, D, h, w); in training mode also update the codebook statistics."""
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            return self._quantize(z_e.float())

    def _quantize(self, z_e: Tensor) -> QuantizerOutput:
        batch, _, height, width = z_e.shape
        vectors = self._flatten(z_e)  # (N, D)
        if self.training:
            self._initialize_or_restart(vectors.detach())
        codebook = self.normalized_codebook()
        with torch.no_grad():
            indices = squared_distances(vectors, codebook).argmin(dim=1)  # (N,)
        codes = F.embedding(indices, codebook)  # (N, D); the codebook term's gradient enters here
        loss = self.config.beta * F.mse_loss(vectors, codes.detach())
        if not self.uses_ema:
            loss = loss + F.mse_loss(codes, vectors.detach())
        counts = torch.bincount(indices, minlength=self.config.codebook_size)
        if self.training:
            self._record(vectors.detach(), indices, counts)
        # Straight-through estimator in taming's exact form, which keeps imported models bit-identical.
        z_q = vectors + (codes - vectors).detach()
        return QuantizerOutput(
            # contiguous NCHW: a channels-last view would switch the decoder's convolutions to other kernels
            z_q=rearrange(z_q, "(b h w) d -> b d h w", b=batch, h=height, w=width).contiguous(),
            indices=rearrange(indices, "(b h w) -> b h w", b=batch, h=height, w=width),
            loss=loss,
            perplexity=self._perplexity(counts),
            usage=self._usage(counts),
        )

    @torch.no_grad()
    def lookup(self, z_e: Tensor) -> Tensor:
        """Code indices (B, h, w) int64 of encoder outputs (B, D, h, w), without touching any statistic."""
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            batch, _, height, width = z_e.shape
            indices = squared_distances(self._flatten(z_e.float()), self.normalized_codebook()).argmin(dim=1)
        return rearrange(indices, "(b h w) -> b h w", b=batch, h=height, w=width)

    def embed(self, indices: Tensor) -> Tensor:
        """Codes (B, D, h, w) fp32 of indices (B, h, w); the inverse of :meth:`lookup`."""
        codes = F.embedding(indices.long(), self.normalized_codebook())
        return rearrange(codes, "b h w d -> b d h w").contiguous()

    def _flatten(self, z_e: Tensor) -> Tensor:
        # contiguous (N, D), the layout taming's distance matmul sees, so the sums round identically
        vectors = rearrange(z_e, "b d h w -> (b h w) d").contiguous()
        return F.normalize(vectors, dim=1) if self.config.l2_normalize else vectors

    @torch.no_grad()
    def _initialize_or_restart(self, vectors: Tensor) -> None:
        if not bool(self.initialized):
            centroids = _broadcast_from_rank0(kmeans(vectors, self.config.codebook_size,
                                                     self.config.kmeans_iters, self.config.l2_normalize))
            self._set_codes(torch.arange(self.config.codebook_size, device=vectors.device), centroids)
            self.initialized.fill_(True)
        if self.config.dead_code_threshold > 0:
            # last_used is identical on every process (it comes from summed counts), so is `dead`
            dead = (self.step + 1 - self.last_used > self.config.dead_code_threshold).nonzero().squeeze(1)
            if dead.numel():
                picks = _random_rows(len(vectors), dead.numel(), vectors.device)
                self._set_codes(dead, _broadcast_from_rank0(vectors[picks].clone()))

    def _set_codes(self, which: Tensor, values: Tensor) -> None:
        """Overwrite codes ``which`` (M,) with ``values`` (M, D), and their EMA statistics with them."""
        self.codebook.data[which] = values.to(self.codebook.dtype)
        if self.uses_ema:
            self.ema_cluster_size[which] = 1.0
            self.ema_embed_sum[which] = values

    @torch.no_grad()
    def _record(self, vectors: Tensor, indices: Tensor, counts: Tensor) -> None:
        """Advance the step, stamp the codes used anywhere in this step, and apply the EMA update."""
        size = self.config.codebook_size
        if self.uses_ema:
            sums = torch.zeros(size, vectors.shape[1], device=vectors.device).index_add_(0, indices, vectors)
            totals = _all_reduce_sum(torch.cat([counts.float()[:, None], sums], dim=1))  # one collective
            global_counts, sums = totals[:, 0], totals[:, 1:]
            self._ema_update(global_counts, sums)
        else:
            global_counts = _all_reduce_sum(counts.clone())
        self.step += 1
        self.last_used[global_counts > 0] = self.step

    def _ema_update(self, counts: Tensor, sums: Tensor) -> None:
        decay, eps, size = self.config.ema_decay, self.config.ema_eps, self.config.codebook_size
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + eps) / (total + size * eps) * total  # Laplace smoothing
        self.codebook.copy_(self.ema_embed_sum / smoothed[:, None])

    @staticmethod
    def _perplexity(counts: Tensor) -> Tensor:
        probabilities = counts.float() / counts.sum().clamp(min=1)
        return torch.exp(torch.special.entr(probabilities).sum())

    def _usage(self, counts: Tensor) -> Tensor:
        if not self.training:
            return (counts > 0).float().mean()
        window_start = (self.step - self.config.usage_window).clamp(min=0)
        return (self.last_used > window_start).float().mean()


def _random_rows(available: int, wanted: int, device: torch.device) -> Tensor:
    """Random row indices: distinct while the batch has enough rows, with repeats otherwise."""
    if available >= wanted:
        return torch.randperm(available, device=device)[:wanted]
    return torch.randint(available, (wanted,), device=device)


@torch.no_grad()
def kmeans(vectors: Tensor, clusters: int, iters: int = 10, spherical: bool = False) -> Tensor:
    """Lloyd's k-means of vectors (N, D) -> centroids (clusters, D), seeded with random vectors.

    A centroid that loses all its vectors keeps its previous position. ``spherical`` renormalises the
    centroids after every step (k-means on the unit sphere, for l2-normalised codes).
    """
    centroids = vectors[_random_rows(len(vectors), clusters, vectors.device)].clone()
    for _ in range(iters):
        assignment = squared_distances(vectors, centroids).argmin(dim=1)
        counts = torch.bincount(assignment, minlength=clusters)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, vectors)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        if spherical:
            centroids = F.normalize(centroids, dim=1)
    return centroids

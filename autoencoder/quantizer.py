"""Vector quantization: nearest-code lookup, straight-through gradient, and codebook health.

Shape vocabulary: B batch, D code width, h w latent grid, N = B*h*w vectors, K codebook size.

Loss (van den Oord et al. 2017, eq. 3, with beta where the paper puts it)::

    loss = ||sg[z_e] - e||^2  +  beta * ||z_e - sg[e]||^2
           codebook term          commitment term

The codebook term moves the codes toward the encoder outputs and reaches only the codebook; the
commitment term keeps the encoder near its codes and reaches only the encoder. taming-transformers and
diffusers put beta on the codebook term instead (their ``legacy=True``). Imported weights give the same
``z_q`` and indices here as there (eval mode, which keeps taming's exact distance arithmetic; training
lookups use a chunked form of bounded memory, which can differ only on exact floating-point ties);
only the training loss differs. With EMA updates the codebook term is
dropped, because the codes then follow running averages instead of gradients.

Steps: the quantizer's statistics advance once per optimizer step. A training forward ends a step
unless :func:`mark_micro_step` said otherwise: under gradient accumulation the loop marks every
micro-batch but the last, and the quantizer sums the micro-batches' counts (and EMA sums and vectors)
until the last one, so one step of accumulation changes the quantizer exactly as one forward of the
whole batch does. Every codebook change (EMA update, k-means initialisation, dead-code restart) happens
at the end of a step, after that forward's lookup: all micro-batches of a step see the same codes.

Statistics: in training mode ``usage`` is the fraction of codes used within the last ``usage_window``
steps and ``perplexity`` is exp(entropy) of the code counts summed over those steps, counted over all
processes, so N processes with batches of B report what one process with a batch of N x B reports.
A micro-batch that does not end its step reports the window as the last ended step left it. In eval
mode nothing is recorded and both describe the current batch alone.

Codebook health at scale: k-means waits until the processes together hold ``vectors_per_code`` x K
recent vectors (or ``kmeans_max_steps`` steps have passed), gathers them, clusters them on process 0
and broadcasts the centroids. Dead codes restart from vectors drawn from process 0's buffer of the
last ``vectors_per_code`` x K vectors, so a step can restart more codes than its batch holds vectors.
The buffers and the window live outside the state dict; see :mod:`autoencoder.codebook_health`.

Distributed training: when ``torch.distributed`` is initialised, code counts (and EMA sums) are summed
over processes, and k-means centroids and restarted codes are broadcast from rank 0, so every process
holds the same codebook.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from autoencoder.codebook_health import (
    RecentVectors,
    StepAccumulator,
    WindowedCounts,
    all_gather_rows,
    all_reduce_sum,
    broadcast_from_rank0,
    is_rank0,
    kmeans,
    nearest_codes,
    perplexity,
    random_rows,
    squared_distances,
)


@dataclass(frozen=True)
class QuantizerConfig:
    """Options of :class:`VectorQuantizer`, and the only place their defaults live (the autoencoder
    config nests one). The defaults keep the codebook healthy; :data:`CLASSIC_QUANTIZER` is taming's.

    Attributes:
        codebook_size: K, the number of codes.
        code_dim: D, the width of one code; None inside an autoencoder config, which takes it from the
            autoencoder's ``code_dim`` (:meth:`AutoencoderConfig.resolved_quantizer`).
        beta: weight of the commitment term.
        l2_normalize: look up l2-normalised vectors among l2-normalised codes (cosine similarity,
            ViT-VQGAN); ``z_q`` is then unit-norm.
        kmeans_init: replace the codebook by k-means centroids of recent encoder vectors, once, as soon
            as the processes together hold ``vectors_per_code`` x K of them (see ``kmeans_max_steps``).
        kmeans_iters: Lloyd iterations for that k-means (0: the k-means++-style seeds alone).
        kmeans_max_steps: run the k-means after this many steps even with fewer vectors than asked
            for (fewer than K vectors then give duplicate codes, with a warning).
        vectors_per_code: the k-means waits for this many vectors per code; each process keeps this
            many per code for dead-code restarts. Fewer than one per code forces duplicate codes, and
            about one per code makes every centroid a single sample; 4 leaves the Lloyd steps something
            to average while the buffer stays small (4 x K x D floats: 2 MiB for K = 16,384, D = 8).
        dead_code_threshold: reset codes unused for this many training steps to random recent encoder
            vectors (0: off). A code just initialised or restarted gets as many steps to be picked.
        usage_window: the number of recent training steps ``usage`` and ``perplexity`` count over.
        ema_decay: update codes as exponential moving averages of their assigned vectors (0: off,
            codes learn from the codebook term instead).
        ema_eps: Laplace smoothing of the EMA cluster sizes, so rarely used codes do not divide by zero.
    """

    codebook_size: int = 1024
    code_dim: int | None = None
    beta: float = 0.25
    l2_normalize: bool = True
    kmeans_init: bool = True
    kmeans_iters: int = 10
    kmeans_max_steps: int = 50
    vectors_per_code: int = 4
    dead_code_threshold: int = 100
    usage_window: int = 100
    ema_decay: float = 0.0
    ema_eps: float = 1e-5

    def __post_init__(self) -> None:
        problems = [f"{name} must be >= 1, got {getattr(self, name)}"
                    for name in ("codebook_size", "code_dim", "kmeans_max_steps", "vectors_per_code", "usage_window")
                    if getattr(self, name) is not None and getattr(self, name) < 1]
        if not 0.0 <= self.ema_decay < 1.0:
            problems.append(f"ema_decay must be in [0, 1) (0 turns EMA updates off), got {self.ema_decay}")
        if self.dead_code_threshold < 0 or self.kmeans_iters < 0:
            problems.append("dead_code_threshold and kmeans_iters must be >= 0")
        if problems:
            raise ValueError("invalid QuantizerConfig: " + "; ".join(problems))


# taming-transformers' quantizer: no l2 normalisation, random init, no restarts (imported weights use it)
CLASSIC_QUANTIZER = QuantizerConfig(l2_normalize=False, kmeans_init=False, dead_code_threshold=0)


class QuantizerOutput(NamedTuple):
    """What :meth:`VectorQuantizer.forward` returns.

    Attributes:
        z_q: (B, D, h, w) fp32 quantized latents; the forward value is the code, the gradient passes
            straight through to ``z_e``.
        indices: (B, h, w) int64 code indices in [0, K).
        loss: () codebook term + beta * commitment term (commitment term only with EMA updates).
        perplexity: () exp(entropy) of the code histogram, in [1, K]: over the recent window and all
            processes in training mode, of this batch in eval mode (see the module docstring); logging only.
        usage: () fraction of codes used, in [0, 1], over the same counts as ``perplexity``.
    """

    z_q: Tensor
    indices: Tensor
    loss: Tensor
    perplexity: Tensor
    usage: Tensor


class VectorQuantizer(nn.Module):
    """Nearest-neighbour vector quantizer with optional k-means init, dead-code restart and EMA codes.

    The math runs in fp32 even under autocast. State that training changes and a resume needs (the step
    counter, the per-code last-used step, the k-means flag, EMA statistics) lives in buffers, so it is
    saved, restored on resume, and never changed in eval mode.

    Args:
        config: the quantizer options.
    """

    # Eager inside a compiled autoencoder (common.compile.compile_in_place reads this): the statistics change
    # Python counters every step (each change would recompile), and k-means or a restart may rewrite the
    # codebook between the forward and backward passes, which the forward's copy of the codebook only
    # guards against eagerly. A flag, not @torch.compiler.disable: that imports torch._dynamo (~4 s, ~80 MB)
    # into every process that imports the autoencoder.
    compile_eager = True

    def __init__(self, config: QuantizerConfig) -> None:
        super().__init__()
        if config.code_dim is None:
            raise ValueError("QuantizerConfig.code_dim is None (taken from the autoencoder); pass "
                             "AutoencoderConfig.resolved_quantizer(), or set code_dim")
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
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # optimizer steps seen
        # the step at which each code was last used, initialised or restarted
        self.register_buffer("last_used", torch.zeros(size, dtype=torch.long))
        self.recent = RecentVectors(config.vectors_per_code * size)
        self.window = WindowedCounts(config.usage_window, size)
        self.pending = StepAccumulator()
        self.ends_step = True  # see mark_micro_step; applies to the next training forward only

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
        # A copy in training mode: the end of the step may rewrite codes (k-means, restarts) before the
        # backward pass, which must still see the codes this forward used.
        weights = self.codebook.clone() if self.training else self.codebook
        codebook = F.normalize(weights, dim=1) if self.config.l2_normalize else weights
        with torch.no_grad():  # training: bounded memory at scale; eval: taming's exact arithmetic
            indices = nearest_codes(vectors, codebook) if self.training else self._nearest(vectors, codebook)
        codes = F.embedding(indices, codebook)  # (N, D); the codebook term's gradient enters here
        loss = self.config.beta * F.mse_loss(vectors, codes.detach())
        if not self.uses_ema:
            loss = loss + F.mse_loss(codes, vectors.detach())
        counts = torch.bincount(indices, minlength=self.config.codebook_size)
        if self.training:
            self._record(vectors.detach(), indices, counts)
            stats = self.window.perplexity(z_e.device), self.window.usage(z_e.device)
        else:
            stats = perplexity(counts), (counts > 0).float().mean()
        # Straight-through estimator in taming's exact form, which keeps imported models bit-identical.
        z_q = vectors + (codes - vectors).detach()
        return QuantizerOutput(
            # contiguous NCHW: a channels-last view would switch the decoder's convolutions to other kernels
            z_q=rearrange(z_q, "(b h w) d -> b d h w", b=batch, h=height, w=width).contiguous(),
            indices=rearrange(indices, "(b h w) -> b h w", b=batch, h=height, w=width),
            loss=loss,
            perplexity=stats[0],
            usage=stats[1],
        )

    @torch.no_grad()
    def lookup(self, z_e: Tensor) -> Tensor:
        """Code indices (B, h, w) int64 of encoder outputs (B, D, h, w), without touching any statistic."""
        with torch.autocast(device_type=z_e.device.type, enabled=False):
            batch, _, height, width = z_e.shape
            indices = self._nearest(self._flatten(z_e.float()), self.normalized_codebook())
        return rearrange(indices, "(b h w) -> b h w", b=batch, h=height, w=width)

    @staticmethod
    def _nearest(vectors: Tensor, codebook: Tensor) -> Tensor:
        """(N,) nearest codes exactly as taming-transformers finds them, ties included."""
        return squared_distances(vectors, codebook).argmin(dim=1)

    def embed(self, indices: Tensor) -> Tensor:
        """Codes (B, D, h, w) fp32 of indices (B, h, w); the inverse of :meth:`lookup`."""
        codes = F.embedding(indices.long(), self.normalized_codebook())
        return rearrange(codes, "b h w d -> b d h w").contiguous()

    def _flatten(self, z_e: Tensor) -> Tensor:
        # contiguous (N, D), the layout taming's distance matmul sees, so the sums round identically
        vectors = rearrange(z_e, "b d h w -> (b h w) d").contiguous()
        return F.normalize(vectors, dim=1) if self.config.l2_normalize else vectors

    # ---------------------------------------------------------------- training-time bookkeeping

    @property
    def _needs_vectors(self) -> bool:
        return not bool(self.initialized) or self.config.dead_code_threshold > 0

    @torch.no_grad()
    def _record(self, vectors: Tensor, indices: Tensor, counts: Tensor) -> None:
        """Add a micro-batch to the step in progress; end the step unless it was marked otherwise."""
        self.pending.add(vectors, indices, counts, sums=self.uses_ema, keep_vectors=self._needs_vectors)
        ends_step, self.ends_step = self.ends_step, True
        if ends_step:
            self._end_step()

    @torch.no_grad()
    def _end_step(self) -> None:
        """Advance the step with everything its micro-batches saw, then change codes that need it."""
        counts, sums, vectors = self.pending.take()
        if vectors is not None:
            self.recent.push(vectors)
        counts, sums, held = self._sum_over_processes(counts, sums)  # held: vectors buffered, all processes
        self.step += 1
        self.last_used[counts > 0] = self.step
        self.window.add(counts)
        if self.uses_ema:
            self._ema_update(counts.float(), sums)
        if not bool(self.initialized):
            if int(held) >= self.recent.capacity or int(self.step) >= self.config.kmeans_max_steps:
                self._kmeans_initialize()
        elif self.config.dead_code_threshold > 0:
            self._restart_dead_codes()

    def _sum_over_processes(self, counts: Tensor, sums: Tensor | None) -> tuple[Tensor, Tensor | None, Tensor]:
        """One collective for the step: counts (K,), EMA sums (K, D), and the vectors every process holds.

        Counts travel as fp32, exact up to 2**24 uses of one code in one step. Returns (counts (K,) int64,
        sums (K, D) or None, the number of buffered vectors () on the device).
        """
        size = self.config.codebook_size
        held = torch.tensor([float(len(self.recent))], device=counts.device)
        parts = [counts.float(), held] + ([sums.flatten()] if sums is not None else [])
        total = all_reduce_sum(torch.cat(parts))
        sums = total[size + 1:].view(size, -1) if sums is not None else None
        return total[:size].round().long(), sums, total[size]

    def _kmeans_initialize(self) -> None:
        """Codes := k-means centroids of every process's recent vectors, computed on process 0."""
        pool = all_gather_rows(self.recent.contents())
        size, target = self.config.codebook_size, self.recent.capacity
        if is_rank0():
            if len(pool) > target:  # bounded work, whatever the number of processes
                pool = pool[random_rows(len(pool), target, pool.device)]
            if len(pool) < size:
                warnings.warn(f"k-means initialisation from {len(pool)} vectors for {size} codes (after "
                              f"kmeans_max_steps={self.config.kmeans_max_steps} steps): some codes start "
                              "as duplicates; dead-code restarts can separate them", RuntimeWarning, stacklevel=2)
            centroids = kmeans(pool, size, self.config.kmeans_iters, self.config.l2_normalize)
        else:
            centroids = torch.empty_like(self.codebook)
        self._set_codes(torch.arange(size, device=self.codebook.device), broadcast_from_rank0(centroids))
        self.initialized.fill_(True)
        self.last_used.fill_(int(self.step))  # every code gets dead_code_threshold steps to be picked
        if self.config.dead_code_threshold == 0:
            self.recent.clear()  # nothing will read it again

    def _restart_dead_codes(self) -> None:
        """Codes unused for dead_code_threshold steps := distinct random vectors of process 0's buffer."""
        # last_used and step are identical on every process (they come from summed counts), so is `dead`
        dead = (self.step - self.last_used >= self.config.dead_code_threshold).nonzero().squeeze(1)
        if not dead.numel():
            return
        if is_rank0():
            values = self.recent.sample(dead.numel())
        else:
            values = torch.empty(dead.numel(), self.config.code_dim, device=self.codebook.device)
        self._set_codes(dead, broadcast_from_rank0(values))
        self.last_used[dead] = self.step

    def _set_codes(self, which: Tensor, values: Tensor) -> None:
        """Overwrite codes ``which`` (M,) with ``values`` (M, D), and their EMA statistics with them."""
        self.codebook.data[which] = values.to(self.codebook.dtype)
        if self.uses_ema:
            self.ema_cluster_size[which] = 1.0
            self.ema_embed_sum[which] = values

    def _ema_update(self, counts: Tensor, sums: Tensor) -> None:
        decay, eps, size = self.config.ema_decay, self.config.ema_eps, self.config.codebook_size
        self.ema_cluster_size.mul_(decay).add_(counts, alpha=1 - decay)
        self.ema_embed_sum.mul_(decay).add_(sums, alpha=1 - decay)
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + eps) / (total + size * eps) * total  # Laplace smoothing
        self.codebook.copy_(self.ema_embed_sum / smoothed[:, None])


def mark_micro_step(model: nn.Module, last: bool) -> None:
    """Tell every quantizer in ``model`` whether its next training forward is the last of its optimizer step.

    Under gradient accumulation, call it before each forward with ``accelerator.sync_gradients``: the
    quantizers then sum the micro-batches and advance their step, statistics and codebook once per
    optimizer step. The mark applies to the next training forward only; unmarked forwards each end a
    step, which is right without accumulation.
    """
    for module in model.modules():
        if isinstance(module, VectorQuantizer):
            module.ends_step = last

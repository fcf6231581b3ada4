"""Training-time helpers of the vector quantizer: a buffer of recent encoder vectors, code counts over a
window of recent steps, the per-step sums of gradient-accumulation micro-batches, a k-means that scales to
large codebooks, and the collectives that keep every process's codebook identical.

Shape vocabulary: N vectors, D code width, K codebook size, W window length in optimizer steps.

None of the state kept here is part of the quantizer's ``state_dict``, on purpose:

- components load strictly (``common.checkpoint.load_state_strict``), so a new tensor in the state dict
  would make every earlier checkpoint unloadable;
- DDP broadcasts registered buffers from process 0 before every forward, which would overwrite each
  process's own recent vectors with process 0's.

The cost is on resume: the recent-vector buffer and the count window start empty again. The window
only feeds the logged ``usage`` and ``perplexity``. The buffer feeds dead-code restarts: a resumed run
restarts the same codes with the same vectors as an uninterrupted one as soon as one step has refilled
process 0's buffer (at once when a step has at least ``vectors_per_code`` x K vectors per process);
until then its draws come from the steps since the resume only.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

# Vectors are compared with codes in chunks of at most this many distances (64 MiB in fp32), so that
# 4 x 16,384 vectors against 16,384 codes never materialise a 4 GiB distance matrix.
DISTANCE_CHUNK_ELEMENTS = 2**24


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_rank0() -> bool:
    return not distributed() or dist.get_rank() == 0


def all_reduce_sum(tensor: Tensor) -> Tensor:
    if distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_from_rank0(tensor: Tensor) -> Tensor:
    if distributed():
        dist.broadcast(tensor, src=0)
    return tensor


def all_gather_rows(rows: Tensor) -> Tensor:
    """Concatenate every process's rows (N_p, D) in rank order; the N_p may differ between processes."""
    if not distributed():
        return rows
    world = dist.get_world_size()
    size = torch.tensor([len(rows)], device=rows.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(sizes).item())
    padded = rows.new_zeros(longest, rows.shape[1])  # all_gather needs equal shapes
    padded[:len(rows)] = rows
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[:int(n.item())] for part, n in zip(parts, sizes)])


def squared_distances(vectors: Tensor, codebook: Tensor) -> Tensor:
    """Squared Euclidean distances (N, D), (K, D) -> (N, K).

    Expanded as |z|^2 + |e|^2 - 2 z.e, exactly as taming-transformers computes it, so that the argmin
    (and its tie-breaking) of imported models is reproduced bit for bit.
    """
    return (vectors.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1)
            - 2 * torch.matmul(vectors, codebook.t()))


def _chunked_code_scores(vectors: Tensor, codebook: Tensor):
    """Yield |e|^2 - 2 z.e (rows, K) for chunks of the vectors: the squared distance less |z|^2, which
    does not change the nearest code. One fused multiply-add per chunk, a chunk of bounded memory."""
    code_norms = codebook.pow(2).sum(dim=1)
    for part in vectors.split(max(1, DISTANCE_CHUNK_ELEMENTS // len(codebook))):
        yield part, torch.addmm(code_norms, part, codebook.t(), alpha=-2)


def nearest_codes(vectors: Tensor, codebook: Tensor) -> Tensor:
    """Index (N,) of the nearest code of every vector, in memory bounded whatever N and K.

    The k-means and the quantizer's training lookups use it; the quantizer's eval lookups keep
    taming's exact arithmetic (:func:`squared_distances`), which the two can differ from only on
    exact floating-point ties.
    """
    return torch.cat([scores.argmin(dim=1) for _, scores in _chunked_code_scores(vectors, codebook)])


def nearest_distances(vectors: Tensor, codebook: Tensor) -> Tensor:
    """Squared distance (N,) from every vector to its nearest code."""
    return torch.cat([(scores.min(dim=1).values + part.pow(2).sum(dim=1)).clamp(min=0)
                      for part, scores in _chunked_code_scores(vectors, codebook)])


def random_rows(available: int, wanted: int, device: torch.device) -> Tensor:
    """Random row indices: distinct while there are enough rows, with repeats otherwise."""
    if available >= wanted:
        return torch.randperm(available, device=device)[:wanted]
    return torch.randint(available, (wanted,), device=device)


@torch.no_grad()
def kmeans_seeds(vectors: Tensor, clusters: int) -> Tensor:
    """Indices (clusters,) of seed vectors, drawn like k-means++ but in doubling rounds.

    k-means++ draws each seed with probability proportional to its squared distance to the seeds so
    far; that covers every well-separated cluster, where uniform seeds miss some, and Lloyd's steps
    never recover a missed cluster. One seed at a time would take K sequential passes (16,384 at
    scale); drawing as many new seeds as there already are, in log2(K) rounds, keeps the work at one
    distance per candidate and seed. The candidates are a random subset of 2 vectors per code (all
    of them up to 4096): the weighting needs the spread of the data, not every vector, and at 4
    vectors per code this halves the work. Seeds are distinct vectors while enough candidates lie
    away from the seeds; the rest are random candidates.
    """
    candidates = random_rows(len(vectors), min(len(vectors), max(2 * clusters, 4096)), vectors.device)
    pool = vectors[candidates]
    chosen = random_rows(len(pool), 1, pool.device)
    distance = nearest_distances(pool, pool[chosen])
    distance[chosen] = 0  # rounding can leave a seed a tiny distance from itself
    while len(chosen) < clusters:
        away = int((distance > 0).sum())
        wanted = min(len(chosen), clusters - len(chosen))
        if away < wanted:  # too few distinct vectors left: complete with random ones
            extra = random_rows(len(pool), clusters - len(chosen) - away, pool.device)
            new = torch.cat([distance.nonzero().squeeze(1), extra])
        else:
            new = torch.multinomial(distance, wanted, replacement=False)
        chosen = torch.cat([chosen, new])
        distance = torch.minimum(distance, nearest_distances(pool, pool[new]))
        distance[new] = 0
    return candidates[chosen]


@torch.no_grad()
def kmeans(vectors: Tensor, clusters: int, iters: int = 10, spherical: bool = False) -> Tensor:
    """Lloyd's k-means of vectors (N, D) -> centroids (clusters, D), from :func:`kmeans_seeds`.

    A centroid that loses all its vectors keeps its previous position. ``spherical`` renormalises the
    centroids after every step (k-means on the unit sphere, for l2-normalised codes).
    """
    centroids = vectors[kmeans_seeds(vectors, clusters)].clone()
    for _ in range(iters):
        assignment = nearest_codes(vectors, centroids)
        counts = torch.bincount(assignment, minlength=clusters)
        sums = torch.zeros_like(centroids).index_add_(0, assignment, vectors)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
        if spherical:
            centroids = F.normalize(centroids, dim=1)
    return centroids


def perplexity(counts: Tensor) -> Tensor:
    """exp(entropy) of a code histogram (K,): 1 for a single code, K for a uniform spread."""
    probabilities = counts.float() / counts.sum().clamp(min=1)
    return torch.exp(torch.special.entr(probabilities).sum())


class RecentVectors:
    """A ring buffer of the last ``capacity`` vectors this process saw.

    Allocated on first use, on the device of the vectors pushed into it (the module's ``.to()`` does
    not see it, see the module docstring).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.data: Tensor | None = None
        self.pushed = 0

    def __len__(self) -> int:
        return min(self.pushed, self.capacity)

    def push(self, vectors: Tensor) -> None:
        """Store vectors (N, D), overwriting the oldest; more than ``capacity`` keeps a random subset."""
        if len(vectors) > self.capacity:  # a random subset, not the last rows: those are the last images
            vectors = vectors[random_rows(len(vectors), self.capacity, vectors.device)]
        if self.data is None:
            self.data = torch.zeros(self.capacity, vectors.shape[1], device=vectors.device)
        self.data = self.data.to(vectors.device)  # the module may have moved since
        slots = (self.pushed + torch.arange(len(vectors), device=vectors.device)) % self.capacity
        self.data[slots] = vectors.float()
        self.pushed += len(vectors)

    def contents(self) -> Tensor:
        """The stored vectors (len(self), D), in no particular order."""
        return self.data[:len(self)] if self.data is not None else torch.zeros(0, 0)

    def sample(self, wanted: int) -> Tensor:
        """``wanted`` stored vectors (wanted, D), all distinct while the buffer holds that many."""
        return self.data[random_rows(len(self), wanted, self.data.device)].clone()

    def clear(self) -> None:
        self.data, self.pushed = None, 0


class WindowedCounts:
    """Per-code counts summed over the last ``window`` optimizer steps.

    Keeps one (W, K) int32 row per step (W x K x 4 bytes: 64 MiB for W = 1000, K = 16,384) and their
    running total, so that each step costs O(K) and the sum is exact.
    """

    def __init__(self, window: int, size: int) -> None:
        self.window, self.size = window, size
        self.history: Tensor | None = None  # allocated on first use, on the counts' device
        self.total = torch.zeros(size, dtype=torch.long)
        self.steps = 0

    def add(self, counts: Tensor) -> None:
        """Account one step's counts (K,), all processes together; the oldest step leaves the window."""
        if self.history is None:
            self.history = torch.zeros(self.window, self.size, dtype=torch.int32, device=counts.device)
        self.history, self.total = self.history.to(counts.device), self.total.to(counts.device)
        slot = self.steps % self.window
        self.total += counts.long() - self.history[slot].long()
        self.history[slot] = counts.to(torch.int32)
        self.steps += 1

    def usage(self, device: torch.device) -> Tensor:
        """() fraction of codes used at least once in the window."""
        return (self.total > 0).float().mean().to(device)

    def perplexity(self, device: torch.device) -> Tensor:
        """() perplexity of the window's code histogram."""
        return perplexity(self.total).to(device)


class StepAccumulator:
    """What the micro-batches of the optimizer step in progress saw: code counts, EMA sums, vectors.

    Summing micro-batches before anything changes the codebook is what makes a step of gradient
    accumulation update the quantizer exactly like one forward of the whole batch.
    """

    def __init__(self) -> None:
        self.counts: Tensor | None = None
        self.sums: Tensor | None = None
        self.vectors: list[Tensor] = []

    def clear(self) -> None:
        self.counts, self.sums, self.vectors = None, None, []

    def add(self, vectors: Tensor, indices: Tensor, counts: Tensor, *, sums: bool, keep_vectors: bool) -> None:
        """Account one micro-batch: vectors (N, D) and their code indices (N,) and counts (K,)."""
        self.counts = counts.clone() if self.counts is None else self.counts + counts
        if sums:
            batch_sums = torch.zeros(len(counts), vectors.shape[1], device=vectors.device)
            batch_sums.index_add_(0, indices, vectors)
            self.sums = batch_sums if self.sums is None else self.sums + batch_sums
        if keep_vectors:
            self.vectors.append(vectors)

    def take(self) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """(counts, EMA sums or None, the step's vectors or None), and start a new step."""
        vectors = torch.cat(self.vectors) if self.vectors else None
        taken = (self.counts, self.sums, vectors)
        self.clear()
        return taken

"""VectorQuantizer: loss placement, gradient routing, codebook health options (also at 16,384 codes),
per-optimizer-step statistics under gradient accumulation, DDP consistency of codebooks and statistics."""
from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from einops import rearrange

from autoencoder.quantizer import CLASSIC_QUANTIZER, QuantizerConfig, VectorQuantizer, kmeans, mark_micro_step

PLAIN = dataclasses.replace(CLASSIC_QUANTIZER, codebook_size=16, code_dim=4, beta=0.3)


def clustered(n: int = 512, clusters: int = 8, dim: int = 4, seed: int = 0, spread: float = 0.05) -> torch.Tensor:
    """(n, dim) points around ``clusters`` well-separated centres."""
    generator = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(clusters, dim, generator=generator)
    labels = torch.arange(n) % clusters
    return centres[labels] + spread * torch.randn(n, dim, generator=generator)


def as_map(vectors: torch.Tensor, batch: int = 2) -> torch.Tensor:
    """(N, D) -> (B, D, h, w) with h = N / (B * 8), w = 8."""
    return rearrange(vectors, "(b h w) d -> b d h w", b=batch, w=8)


def quantization_error(quantizer: VectorQuantizer, z: torch.Tensor) -> float:
    quantizer.eval()
    with torch.no_grad():
        return F.mse_loss(quantizer(z).z_q, z).item()


def test_plain_mode_reproduces_taming_exactly():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from taming.modules.vqvae.quantize import VectorQuantizer as TamingQuantizer
    torch.manual_seed(0)
    theirs = TamingQuantizer(64, 4, beta=0.25)
    torch.nn.init.normal_(theirs.embedding.weight)
    ours = VectorQuantizer(dataclasses.replace(CLASSIC_QUANTIZER, codebook_size=64, code_dim=4)).eval()
    ours.codebook.data.copy_(theirs.embedding.weight)
    z = torch.randn(3, 4, 5, 7)
    z_q, _, (_, _, indices) = theirs(z)
    out = ours(z)
    assert torch.equal(out.indices.flatten(), indices.flatten())
    assert torch.equal(out.z_q, z_q)
    assert out.indices.shape == (3, 5, 7) and out.indices.dtype == torch.int64


def test_beta_multiplies_the_commitment_term_and_each_term_reaches_one_side():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(PLAIN)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    out = quantizer(z)
    out.loss.backward()
    codes = quantizer.codebook.detach()[out.indices.flatten()]  # (N, D)
    flat = rearrange(z.detach(), "b d h w -> (b h w) d")
    # loss = mean((e - sg z)^2) + beta * mean((z - sg e)^2)
    expected_z = PLAIN.beta * 2 * (flat - codes) / flat.numel()
    expected_codebook = torch.zeros_like(quantizer.codebook).index_add_(
        0, out.indices.flatten(), 2 * (codes - flat) / flat.numel())
    torch.testing.assert_close(rearrange(z.grad, "b d h w -> (b h w) d"), expected_z)
    torch.testing.assert_close(quantizer.codebook.grad, expected_codebook)
    torch.testing.assert_close(out.loss, F.mse_loss(codes, flat) * (1 + PLAIN.beta))


def test_straight_through_passes_the_gradient_unchanged_to_the_input_only():
    quantizer = VectorQuantizer(PLAIN)
    z = torch.randn(2, 4, 3, 3, requires_grad=True)
    upstream = torch.randn(2, 4, 3, 3)
    (quantizer(z).z_q * upstream).sum().backward()
    assert torch.equal(z.grad, upstream)
    assert quantizer.codebook.grad is None


def test_l2_normalized_lookup_uses_cosine_similarity_and_unit_codes():
    config = dataclasses.replace(PLAIN, l2_normalize=True)
    quantizer = VectorQuantizer(config).eval()
    torch.nn.init.normal_(quantizer.codebook)
    z = torch.randn(2, 4, 3, 3) * 5
    out = quantizer(z)
    torch.testing.assert_close(out.z_q.norm(dim=1), torch.ones(2, 3, 3))
    cosine = F.normalize(rearrange(z, "b d h w -> (b h w) d"), dim=1) @ F.normalize(quantizer.codebook, dim=1).t()
    assert torch.equal(out.indices.flatten(), cosine.argmax(dim=1))


def test_kmeans_init_beats_random_init_and_runs_once():
    z = as_map(clustered())
    errors = {}
    for name, config in {
        "uniform": PLAIN,
        "random_vectors": dataclasses.replace(PLAIN, kmeans_init=True, kmeans_iters=0),
        "kmeans": dataclasses.replace(PLAIN, kmeans_init=True, kmeans_iters=10),
    }.items():
        torch.manual_seed(0)
        quantizer = VectorQuantizer(config).train()
        quantizer(z)
        errors[name] = quantization_error(quantizer, z)
    assert errors["kmeans"] < errors["random_vectors"] < errors["uniform"]
    assert errors["kmeans"] < 0.01  # every cluster found: only the within-cluster spread is left
    # the initialisation happened once: later batches leave the codebook alone
    quantizer.train()
    before = quantizer.codebook.detach().clone()
    assert bool(quantizer.initialized)
    quantizer(as_map(clustered(seed=1)))
    assert torch.equal(quantizer.codebook.detach(), before)


def test_kmeans_helper_never_increases_the_error():
    vectors = clustered(clusters=5)
    torch.manual_seed(3)
    start = kmeans(vectors, 8, iters=0)
    torch.manual_seed(3)
    end = kmeans(vectors, 8, iters=5)
    error = lambda c: torch.cdist(vectors, c).min(dim=1).values.pow(2).mean()  # noqa: E731
    assert error(end) <= error(start)


def test_dead_code_restart_revives_unused_codes():
    config = dataclasses.replace(PLAIN, dead_code_threshold=2)
    quantizer = VectorQuantizer(config).train()
    with torch.no_grad():
        quantizer.codebook.fill_(100.0)
        quantizer.codebook[0].zero_()  # every vector picks code 0; the other 15 are never used
    z = as_map(clustered())
    usage = [quantizer(z).indices.unique().numel() for _ in range(3)]
    assert usage[:2] == [1, 1]
    assert usage[2] > 8  # restarted on step 3 from batch vectors, and used at once
    assert (quantizer.codebook.detach().abs() < 50).all()


def test_ema_mode_moves_codes_without_gradients():
    config = dataclasses.replace(PLAIN, ema_decay=0.5, kmeans_init=True, kmeans_iters=0)
    quantizer = VectorQuantizer(config).train()
    assert "codebook" not in dict(quantizer.named_parameters())
    vectors = clustered(clusters=4)
    z = as_map(vectors).requires_grad_(True)
    torch.manual_seed(0)
    out = quantizer(z)
    out.loss.backward()
    assert not quantizer.codebook.requires_grad and z.grad is not None
    torch.testing.assert_close(out.loss, config.beta * F.mse_loss(z.detach(), out.z_q.detach()))
    shifted = as_map(vectors + 0.5)
    with torch.no_grad():
        before = quantization_error(quantizer, shifted)
        quantizer.train()
        for _ in range(5):
            quantizer(shifted)
        assert quantization_error(quantizer, shifted) < before / 4


def test_perplexity_and_usage_bounds_and_window():
    config = dataclasses.replace(PLAIN, usage_window=3)
    quantizer = VectorQuantizer(config).train()
    torch.nn.init.normal_(quantizer.codebook)
    out = quantizer(torch.randn(2, 4, 4, 4))
    assert 1.0 <= out.perplexity.item() <= min(16, 32) + 1e-4
    assert 0.0 <= out.usage.item() <= 1.0
    assert out.usage.item() == pytest.approx(out.indices.unique().numel() / 16)
    # Feed only vectors equal to code 0: after the window has passed, usage is 1 / K and perplexity 1.
    only_zero = quantizer.codebook.detach()[0].reshape(1, 4, 1, 1).expand(2, 4, 4, 4)
    for _ in range(3):
        out = quantizer(only_zero)
    assert out.usage.item() == pytest.approx(1 / 16)
    assert out.perplexity.item() == pytest.approx(1.0)
    assert quantizer.step.item() == 4
    quantizer.eval()
    steps = quantizer.step.clone()
    assert quantizer(torch.randn(2, 4, 4, 4)).usage.item() > 1 / 16  # eval: this batch alone
    assert torch.equal(quantizer.step, steps)


def test_quantizer_math_stays_fp32_under_autocast():
    quantizer = VectorQuantizer(PLAIN).eval()
    torch.nn.init.normal_(quantizer.codebook)
    z = torch.randn(2, 4, 3, 3).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = quantizer(z)
    assert out.z_q.dtype == torch.float32 and out.loss.dtype == torch.float32
    assert torch.equal(out.indices, quantizer(z.float()).indices)


def test_lookup_and_embed_are_inverse_and_pure():
    quantizer = VectorQuantizer(dataclasses.replace(PLAIN, l2_normalize=True)).train()
    torch.nn.init.normal_(quantizer.codebook)
    z = torch.randn(2, 4, 3, 3)
    indices = quantizer.lookup(z)
    assert indices.shape == (2, 3, 3) and quantizer.step.item() == 0
    torch.testing.assert_close(quantizer.embed(indices), quantizer(z).z_q)


def test_state_dict_keys_are_those_of_earlier_checkpoints():
    # Components load strictly: a new key would make every saved autoencoder unloadable.
    plain = VectorQuantizer(dataclasses.replace(PLAIN, kmeans_init=True, dead_code_threshold=3))
    assert set(plain.state_dict()) == {"codebook", "initialized", "step", "last_used"}
    ema = VectorQuantizer(dataclasses.replace(PLAIN, ema_decay=0.9))
    assert set(ema.state_dict()) == {"codebook", "ema_cluster_size", "ema_embed_sum", "initialized", "step",
                                     "last_used"}


def test_kmeans_of_16384_codes_waits_for_4_vectors_per_code_and_gives_distinct_codes():
    size, per_batch = 16384, 4096  # a batch holds a quarter of the codebook's size in vectors
    # kmeans_iters=0: the seeds alone (a Lloyd step only averages them; distinct seeds stay distinct),
    # which keeps this test at 2 x 65,536 x 16,384 distances; restarts keep the buffer for the check below
    config = dataclasses.replace(CLASSIC_QUANTIZER, codebook_size=size, code_dim=4, kmeans_init=True, kmeans_iters=0,
                                 dead_code_threshold=10)
    torch.manual_seed(0)
    quantizer = VectorQuantizer(config).train()
    initial = quantizer.codebook.detach().clone()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _ in range(4 * size // per_batch - 1):
            quantizer(torch.randn(per_batch // 64, 4, 8, 8, generator=generator))
        assert not bool(quantizer.initialized) and torch.equal(quantizer.codebook, initial)
        quantizer(torch.randn(per_batch // 64, 4, 8, 8, generator=generator))  # the 4th vector per code
    assert bool(quantizer.initialized)
    assert len(quantizer.recent) == quantizer.recent.pushed == 4 * size  # what the k-means saw; the bound
    assert torch.unique(quantizer.codebook.detach(), dim=0).shape[0] == size, "duplicate initial codes"


def test_kmeans_runs_after_kmeans_max_steps_with_the_vectors_it_has():
    config = dataclasses.replace(PLAIN, codebook_size=64, kmeans_init=True, kmeans_max_steps=3)
    quantizer = VectorQuantizer(config).train()
    vectors = clustered(n=3 * 64, clusters=8)
    for step in range(3):  # 64 vectors per step, 256 wanted
        assert not bool(quantizer.initialized)
        quantizer(as_map(vectors[64 * step:64 * (step + 1)]))
    assert bool(quantizer.initialized) and quantization_error(quantizer, as_map(vectors)) < 0.01


def test_dead_code_restart_draws_more_codes_than_a_batch_holds_from_recent_steps():
    config = dataclasses.replace(PLAIN, codebook_size=64, dead_code_threshold=4)
    quantizer = VectorQuantizer(config).train()
    with torch.no_grad():
        quantizer.codebook.fill_(100.0)
        quantizer.codebook[0].zero_()  # every vector picks code 0; the other 63 are never used
    batches = [torch.randn(16, 4, generator=torch.Generator().manual_seed(step)) for step in range(5)]
    for batch in batches:  # 16 vectors per step; codes 1..63 are dead after step 4
        quantizer(as_map(batch, batch=1))
    restarted = quantizer.codebook.detach()[1:]
    assert torch.unique(restarted, dim=0).shape[0] == 63, "63 distinct codes from 16-vector batches"
    seen = torch.cat(batches[:4])  # restarted at the end of step 4, from the buffer of steps 1..4
    source = (restarted[:, None] == seen[None]).all(dim=2).float().argmax(dim=1)
    assert (restarted == seen[source]).all()
    assert len(set((source // 16).tolist())) == 4, "drawn from every recent step"


def test_micro_steps_change_the_quantizer_like_one_forward_of_the_whole_batch():
    config = dataclasses.replace(PLAIN, ema_decay=0.5, kmeans_init=True, kmeans_iters=2, dead_code_threshold=1,
                                 usage_window=2)
    whole = VectorQuantizer(config).train()
    micro = VectorQuantizer(config).train()
    micro.load_state_dict(whole.state_dict())
    steps = [as_map(clustered(n=128, clusters=6, seed=step), batch=4) for step in range(3)]
    torch.manual_seed(0)
    outputs = [whole(z) for z in steps]
    torch.manual_seed(0)  # the same draws for k-means and restarts
    for step, z in enumerate(steps):
        mark_micro_step(micro, last=False)
        first = micro(z[:2])
        assert micro.step.item() == step, "a micro-batch that does not end the step does not advance it"
        mark_micro_step(micro, last=True)
        last = micro(z[2:])
        assert micro.step.item() == step + 1
        assert torch.equal(torch.cat([first.indices, last.indices]), outputs[step].indices), step
        torch.testing.assert_close(last.perplexity, outputs[step].perplexity)
        torch.testing.assert_close(last.usage, outputs[step].usage)
    assert bool(micro.initialized)
    for name, value in whole.state_dict().items():
        torch.testing.assert_close(micro.state_dict()[name], value, msg=name)


def _ddp_worker(rank: int, directory: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{directory}/store", rank=rank, world_size=2)
    torch.manual_seed(rank)  # different random picks on each process: only rank 0's may survive
    config = dataclasses.replace(CLASSIC_QUANTIZER, codebook_size=32, code_dim=4, kmeans_init=True, kmeans_iters=3,
                                 dead_code_threshold=1, ema_decay=0.9)
    quantizer = VectorQuantizer(config).train()
    with torch.no_grad():
        for step in range(3):
            quantizer(as_map(clustered(n=256, seed=10 * rank + step)))
    torch.save({name: t.clone() for name, t in quantizer.state_dict().items()}, f"{directory}/rank{rank}.pt")
    # k-means from both processes' vectors: each holds 4 clusters the other never sees
    quantizer = VectorQuantizer(dataclasses.replace(PLAIN, kmeans_init=True)).train()
    with torch.no_grad():
        quantizer(as_map(gather_clusters(rank)))
    torch.save(quantizer.codebook.detach().clone(), f"{directory}/gathered{rank}.pt")
    # statistics: each process quantizes its half of the batches of stats_reference()
    quantizer = stats_quantizer()
    with torch.no_grad():
        stats = [quantizer(z[rank:rank + 1]) for z in stats_batches()]
    torch.save([(out.perplexity, out.usage) for out in stats], f"{directory}/stats{rank}.pt")
    dist.destroy_process_group()


def gather_clusters(rank: int) -> torch.Tensor:
    """(64, 4) vectors around 4 centres of this process's own."""
    return clustered(n=64, clusters=4, seed=30 + rank)


def stats_quantizer() -> VectorQuantizer:
    quantizer = VectorQuantizer(dataclasses.replace(CLASSIC_QUANTIZER, codebook_size=32, code_dim=4, l2_normalize=True,
                                                    usage_window=2))
    torch.nn.init.normal_(quantizer.codebook, generator=torch.Generator().manual_seed(5))
    return quantizer.train()


def stats_batches() -> list[torch.Tensor]:
    """Four steps of 2 items; the items' code histograms differ from each other and from step to step."""
    def item(step: int, which: int) -> torch.Tensor:
        return clustered(n=128, clusters=2 + step + which, seed=20 + 2 * step + which)

    return [as_map(torch.cat([item(step, 0), item(step, 1)])) for step in range(4)]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    directory = tmp_path_factory.mktemp("ddp")
    mp.spawn(_ddp_worker, args=(str(directory),), nprocs=2, join=True)
    return directory


def test_distributed_processes_keep_identical_codebooks(two_processes):
    first, second = (torch.load(two_processes / f"rank{r}.pt") for r in range(2))
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_kmeans_initialisation_clusters_the_vectors_of_every_process(two_processes):
    first, second = (torch.load(two_processes / f"gathered{r}.pt") for r in range(2))
    assert torch.equal(first, second)
    quantizer = VectorQuantizer(PLAIN).eval()
    with torch.no_grad():
        quantizer.codebook.copy_(first)
    for rank in range(2):  # all 8 clusters found: only the within-cluster spread is left
        assert quantization_error(quantizer, as_map(gather_clusters(rank))) < 0.01, f"clusters of rank {rank}"


def test_two_processes_report_the_windowed_statistics_of_one_process_with_the_whole_batch(two_processes):
    reference = stats_quantizer()
    with torch.no_grad():
        expected = [(out.perplexity, out.usage) for out in (reference(z) for z in stats_batches())]
        half = stats_quantizer()
        alone = [half(z[:1]).perplexity for z in stats_batches()]
    for rank in range(2):
        reported = torch.load(two_processes / f"stats{rank}.pt")
        for step, ((perplexity, usage), (want_perplexity, want_usage)) in enumerate(zip(reported, expected)):
            torch.testing.assert_close(perplexity, want_perplexity, msg=f"rank {rank} step {step}")
            torch.testing.assert_close(usage, want_usage, msg=f"rank {rank} step {step}")
    assert all((a - b).abs() > 0.1 for a, (b, _) in zip(alone, expected)), "a half batch differs: not vacuous"
    # the window of 2 steps: the last step's figures count the last two batches, not the first two
    with torch.no_grad():
        last_two = stats_quantizer().eval()(torch.cat(stats_batches()[2:]))
    torch.testing.assert_close(expected[3][0], last_two.perplexity)
    torch.testing.assert_close(expected[3][1], last_two.usage)


def test_the_defaults_keep_the_codebook_healthy_and_code_dim_comes_from_the_autoencoder():
    config = QuantizerConfig()
    assert (config.l2_normalize, config.kmeans_init, config.dead_code_threshold) == (True, True, 100)
    assert (CLASSIC_QUANTIZER.l2_normalize, CLASSIC_QUANTIZER.kmeans_init, CLASSIC_QUANTIZER.dead_code_threshold) == (
        False, False, 0)
    with pytest.raises(ValueError, match="code_dim is None"):
        VectorQuantizer(config)
    with pytest.raises(ValueError, match="ema_decay must be in"):
        QuantizerConfig(ema_decay=1.0)

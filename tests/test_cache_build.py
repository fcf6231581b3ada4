"""On-disk caches: memory-mapped rows, unpadded fp16 text states, and a build shared by processes that resumes."""
from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from common.array_store import Processes, TextStore, open_array, part_range, write_text_part
from common.cache_build import META_FILE, CacheSpec, build_cache, open_cache

ITEMS = 23


def item_rows(indices: range, calls: list[int] | None = None):
    """Deterministic rows (2, 3), labels and captions of items: what an encoder would give, without a model."""
    for start in range(indices.start, indices.stop, 5):
        ids = torch.arange(start, min(start + 5, indices.stop))
        if calls is not None:
            calls.append(int(ids[0]))
        rows = torch.sin(ids[:, None, None] * 0.7 + torch.arange(6).view(1, 2, 3)).float() * 3
        yield rows, ids % 4, [f"caption {i % 7}" for i in ids.tolist()]


def encode_texts(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """States (n, L, 4) that depend on the text alone, padded to the chunk's longest, as a text encoder does."""
    lengths = torch.tensor([1 + len(t) % 5 for t in texts])
    mask = torch.arange(int(lengths.max()))[None] < lengths[:, None]
    code = torch.tensor([sum(map(ord, t)) for t in texts], dtype=torch.float32)
    states = torch.cos(code[:, None, None] + torch.arange(mask.shape[1] * 4).view(1, -1, 4)) * mask[..., None]
    return states, mask


def spec(calls: list[int] | None = None, unit_variance: bool = True) -> CacheSpec:
    return CacheSpec("rows", lambda indices: item_rows(indices, calls), lambda captions: sorted(set(captions)),
                     encode_texts, ("a {}",), unit_variance)


def build_with(processes: int, directory: Path, make_spec=spec, timeout: float = 30) -> list[BaseException]:
    """Build with ``processes`` threads standing in for processes (a barrier between them); their errors."""
    barrier, errors = threading.Barrier(processes, timeout=timeout), []

    def run(rank: int) -> None:
        try:
            build_cache(directory, ITEMS, make_spec(), Processes(rank, processes, barrier.wait), {"note": 1})
        except BaseException as error:  # noqa: BLE001 - reported to the test
            errors.append(error)

    threads = [threading.Thread(target=run, args=(rank,)) for rank in range(processes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_shares_cover_every_item_once():
    for count, parts in ((0, 3), (5, 8), (23, 3), (100, 7)):
        shares = [part_range(count, rank, parts) for rank in range(parts)]
        assert [i for share in shares for i in share] == list(range(count))


def test_a_build_by_three_processes_equals_one_by_one(tmp_path):
    assert not build_with(1, tmp_path / "one") and not build_with(3, tmp_path / "three")
    one, three = open_cache(tmp_path / "one"), open_cache(tmp_path / "three")
    assert torch.equal(one.rows, three.rows) and torch.equal(one.labels, three.labels)
    assert torch.equal(one.caption_ids, three.caption_ids) and list(one.captions) == list(three.captions)
    assert torch.equal(one.variants, three.variants) and one.manifest["note"] == 1
    assert float(one.rows.double().std()) == pytest.approx(1.0, abs=1e-6), "scaled to unit variance (fp32 rows)"
    expected = torch.cat([rows for rows, _, _ in item_rows(range(ITEMS))]) * one.manifest["scale"]
    assert torch.equal(one.rows, expected.float())
    assert [one.captions[i] for i in one.caption_ids.tolist()] == [f"caption {i % 7}" for i in range(ITEMS)]
    every = torch.arange(len(one.captions))
    for a, b in zip(one.text.gather(every), three.text.gather(every)):
        assert torch.equal(a, b)
    assert len(three.manifest["text_parts"]) == 3 and not (tmp_path / "three" / "parts").exists()
    assert isinstance(open_array(tmp_path / "three" / "rows.npy"), np.memmap), "read from disk, not into RAM"


def test_text_states_are_stored_unpadded_in_fp16_and_padded_per_batch(tmp_path):
    assert not build_with(1, tmp_path)
    store = open_cache(tmp_path).text
    texts = list(open_cache(tmp_path).captions)
    states, mask = store.gather(torch.tensor([2, 0]))
    fresh, fresh_mask = encode_texts([texts[2], texts[0]])
    assert torch.equal(mask, fresh_mask) and states.dtype == torch.float32
    torch.testing.assert_close(states, fresh, rtol=2 ** -11, atol=1e-6)
    assert states.shape[1] == int(fresh_mask.sum(1).max()), "padded to this batch's longest text, no further"
    assert store.parts[0].dtype == np.float16
    assert (tmp_path / f"{store_stem(tmp_path)}.bin").stat().st_size == 2 * 4 * int(store.lengths().sum())
    cut, cut_mask = store.gather(torch.tensor([2, 0]), 1)  # fixed slots: longer texts are cut
    assert torch.equal(cut, states[:, :1]) and cut_mask.all()
    wide, wide_mask = store.gather(torch.tensor([2]), 9)
    assert wide.shape == (1, 9, 4) and not wide[0, int(wide_mask.sum()):].any()


def store_stem(directory: Path) -> str:
    return next(directory.glob("text-*.bin")).stem


def test_text_states_beyond_fp16_range_are_stored_in_fp32(tmp_path):
    big = (torch.full((1, 2, 3), 1e6), torch.ones(1, 2, dtype=torch.bool))
    from common.array_store import TextOverflow
    with pytest.raises(TextOverflow):
        write_text_part(tmp_path / "text-a", iter([big]))
    write_text_part(tmp_path / "text-a", iter([big]), np.float32)
    TextStore.save_ends(tmp_path, ["text-a"])
    states, _ = TextStore.open(tmp_path, ["text-a"]).gather(torch.tensor([0]))
    assert torch.equal(states, big[0]) and not list(tmp_path.glob(".*tmp"))


def test_an_interrupted_build_resumes_from_the_finished_shares(tmp_path):
    calls: list[int] = []

    def failing_spec() -> CacheSpec:
        def items(indices: range):
            if indices.start:  # the second process dies while encoding its share
                raise RuntimeError("killed")
            yield from item_rows(indices, calls)
        return CacheSpec("rows", items, lambda captions: sorted(set(captions)), encode_texts, ("a {}",), True)

    errors = build_with(2, tmp_path, failing_spec, timeout=2)
    assert any("killed" in str(e) for e in errors) and not (tmp_path / META_FILE).exists()
    first_share = list(calls)
    calls.clear()
    assert not build_with(2, tmp_path, lambda: spec(calls))
    assert calls and not set(calls) & set(first_share), "the finished share is not encoded again"
    assert not build_with(1, tmp_path / "fresh")
    assert torch.equal(open_cache(tmp_path).rows, open_cache(tmp_path / "fresh").rows)
    assert not list(tmp_path.glob(".*tmp")) and not (tmp_path / "parts").exists()


def test_two_runs_needing_one_cache_build_it_once(tmp_path):
    """A second run (its own group of processes) waits for the first's build, then finds it complete."""
    from common.cache_build import ensure_built

    builds: list[int] = []

    def build() -> None:
        builds.append(1)
        build_cache(tmp_path, ITEMS, spec(), Processes(), {})

    runs = [threading.Thread(target=ensure_built, args=(tmp_path, Processes(), build)) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert builds == [1] and (tmp_path / META_FILE).is_file()

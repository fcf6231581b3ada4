"""Procedural shapes data and its analytic caption scorer (the project's text-alignment metric)."""
from __future__ import annotations

import dataclasses
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageChops, ImageDraw, ImageFilter
from torch.utils.data import DataLoader

from common.data import DataConfig, build_dataset
from common.data.shapes import (
    COLOURS,
    NUM_LABELS,
    POSITIONS,
    SHAPES,
    SIZES,
    Detection,
    ShapeScore,
    ShapesDataset,
    ShapeSpec,
    compare,
    detect,
    evaluation_prompts,
    parse_caption,
    prompt_accuracy,
    render,
    score_image,
)
from common.images import pil_to_tensor

FLOOR = 0.98  # acceptance floor for accuracy and for every rejection rate
COUNT = 1000


def _images(dataset: ShapesDataset, count: int) -> tuple[torch.Tensor, list[ShapeSpec]]:
    items = [dataset[i] for i in range(count)]
    return torch.stack([item["image"] for item in items]), [ShapeSpec.from_label(item["label"]) for item in items]


@pytest.fixture(scope="module")
def train32() -> tuple[torch.Tensor, list[ShapeSpec], list[Detection]]:
    images, specs = _images(ShapesDataset(32, size=COUNT, seed=0), COUNT)
    return images, specs, [detect(image) for image in images]


def _rate(flags: list[bool]) -> float:
    return sum(flags) / len(flags)


def _rejected(detections: list[Detection], specs: list[ShapeSpec]) -> float:
    return _rate([not compare(detection, spec).correct for detection, spec in zip(detections, specs)])


def _random_specs(count: int, seed: int) -> list[ShapeSpec]:
    return [ShapeSpec.from_label(int(label)) for label in np.random.default_rng(seed).integers(NUM_LABELS, size=count)]


# ------------------------------------------------------------------------------------ dataset
def test_items_have_the_documented_format() -> None:
    dataset = ShapesDataset(32, size=10, seed=0)
    item = dataset[3]
    assert len(dataset) == 10
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["image"][:, 0, 0].tolist() == [1.0, 1.0, 1.0], "background must be plain white"
    assert isinstance(item["label"], int) and 0 <= item["label"] < NUM_LABELS
    assert item["caption"] == ShapeSpec.from_label(item["label"]).caption == dataset.spec(3).caption
    assert dataset[10_000]["image"].shape == (3, 32, 32), "any index computes, not just < len"
    for resolution in (64, 128):
        assert ShapesDataset(resolution, size=1)[0]["image"].shape == (3, resolution, resolution)


def test_items_are_deterministic_per_seed_and_split() -> None:
    first, again = ShapesDataset(32, seed=1), ShapesDataset(32, seed=1)
    other, heldout, everything = ShapesDataset(32, seed=2), ShapesDataset(32, seed=1, split="heldout"), \
        ShapesDataset(32, seed=1, split="all")
    for index in (0, 7, 123):
        assert torch.equal(first[index]["image"], again[index]["image"])
        assert first[index]["caption"] == again[index]["caption"]
        assert torch.equal(first[index]["image"], everything[index]["image"])
    assert any(not torch.equal(first[i]["image"], other[i]["image"]) for i in range(5))
    assert any(not torch.equal(first[i]["image"], heldout[i]["image"]) for i in range(5))
    assert [first.spec(i) for i in range(20)] != [heldout.spec(i) for i in range(20)]
    with pytest.raises(ValueError, match="split"):
        ShapesDataset(32, split="validation")


def test_dataset_plugs_into_build_dataset_and_a_data_loader() -> None:
    dataset = build_dataset(DataConfig(name="shapes", resolution=32, size=8, seed=0, split="heldout"))
    assert isinstance(dataset, ShapesDataset) and dataset.split == "heldout"
    batch = next(iter(DataLoader(dataset, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4
    assert batch["label"].dtype == torch.int64


def test_every_combination_is_drawn() -> None:
    labels = {ShapesDataset(32, seed=0).spec(i).label for i in range(5000)}
    assert len(labels) == NUM_LABELS


@pytest.mark.parametrize("resolution", [32, 64, 128])
def test_shapes_stay_inside_their_cell(resolution: int) -> None:
    rng = np.random.default_rng(0)
    cell = resolution / 3
    for label in range(0, NUM_LABELS, 5):
        spec = ShapeSpec.from_label(label)
        ink = np.asarray(render(spec, resolution, rng)).min(axis=-1) < 250
        rows, columns = np.nonzero(ink)
        row, column = divmod(POSITIONS.index(spec.position), 3)
        assert rows.min() >= int(row * cell) and rows.max() < np.ceil((row + 1) * cell), spec
        assert columns.min() >= int(column * cell) and columns.max() < np.ceil((column + 1) * cell), spec


# ------------------------------------------------------------------------------------ captions
def test_caption_grammar() -> None:
    assert ShapeSpec("red", "circle", "small", "top left").caption == "a small red circle at the top left"
    assert ShapeSpec("blue", "square", "large", "center").caption == "a large blue square in the center"
    assert ShapeSpec("green", "triangle", "small", "bottom").caption == "a small green triangle at the bottom"
    assert len(COLOURS) == 6 and len(SHAPES) == 3 and len(SIZES) == 2 and len(POSITIONS) == 9


def test_labels_and_captions_round_trip() -> None:
    specs = [ShapeSpec.from_label(label) for label in range(NUM_LABELS)]
    assert [spec.label for spec in specs] == list(range(NUM_LABELS))
    assert [parse_caption(spec.caption) for spec in specs] == specs
    assert len({spec.caption for spec in specs}) == NUM_LABELS
    assert parse_caption("  A Small  RED circle at the Top Left. ") == ShapeSpec("red", "circle", "small", "top left")
    assert parse_caption("a large orange square in the centre").position == "center"
    with pytest.raises(ValueError):
        ShapeSpec.from_label(NUM_LABELS)
    with pytest.raises(ValueError):
        ShapeSpec("pink", "circle", "small", "top")


@pytest.mark.parametrize("caption", ["a dog", "a small red circle", "a huge red circle at the top", ""])
def test_unparseable_captions_raise_naming_the_caption(caption: str) -> None:
    with pytest.raises(ValueError, match="cannot parse") as error:
        parse_caption(caption)
    assert repr(caption) in str(error.value)


def test_evaluation_prompts_are_fixed_distinct_and_covering() -> None:
    prompts = evaluation_prompts(count=32, seed=0)
    assert prompts == evaluation_prompts(count=32, seed=0) != evaluation_prompts(count=32, seed=1)
    assert len(prompts) == len(set(prompts)) == 32
    specs = [parse_caption(prompt) for prompt in prompts]
    for attribute, values in (("colour", COLOURS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
        assert {getattr(spec, attribute) for spec in specs} == set(values), attribute
    assert len(evaluation_prompts(count=NUM_LABELS)) == NUM_LABELS


# ------------------------------------------------------------------------------------ scorer: accuracy
def test_scorer_accepts_dataset_images_at_32(train32) -> None:
    images, specs, detections = train32
    start = time.perf_counter()
    accuracy = prompt_accuracy(images, [spec.caption for spec in specs])
    seconds = time.perf_counter() - start
    assert accuracy["correct"] >= FLOOR, f"accuracy on dataset images at 32 px: {accuracy}"
    assert accuracy["size"] >= FLOOR, f"size accuracy at 32 px: {accuracy}"
    assert seconds < 10, f"scoring {COUNT} 32 px images took {seconds:.1f} s"
    assert set(accuracy) == {"correct", "colour", "shape", "position", "size"}


def test_scorer_accepts_dataset_images_at_64_and_128() -> None:
    for resolution, count in ((64, 500), (128, 100)):
        images, specs = _images(ShapesDataset(resolution, size=count, seed=5, split="heldout"), count)
        accuracy = prompt_accuracy(images, [spec.caption for spec in specs])
        assert accuracy["correct"] >= FLOOR, f"accuracy at {resolution} px: {accuracy}"


def test_scorer_takes_pil_images_and_batched_tensors(train32) -> None:
    images, specs, _ = train32
    pil = Image.fromarray(((images[0].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8))
    assert score_image(pil, specs[0].caption) == score_image(images[0], specs[0].caption)
    assert score_image(images[:1], specs[0].caption).correct, "a (1, 3, H, W) batch of one is accepted"
    score = score_image(images[0], specs[0].caption)
    assert isinstance(score, ShapeScore) and score.correct


def test_scorer_tolerates_blur_noise_and_colour_drift() -> None:
    """Generated samples are softer and noisier than the data; the metric must not punish that much."""
    rng, flags = np.random.default_rng(0), []
    for spec in _random_specs(300, seed=1):
        image = render(spec, 32, rng).filter(ImageFilter.GaussianBlur(0.6))
        pixels = np.asarray(image, dtype=np.float32) / 255 + rng.normal(0, 0.05, (32, 32, 3))
        pixels += rng.uniform(-0.08, 0.08, 3) * (pixels.mean(axis=-1, keepdims=True) < 0.9)
        tensor = torch.from_numpy(np.clip(pixels, 0, 1) * 2 - 1).permute(2, 0, 1)
        flags.append(score_image(tensor, spec.caption).correct)
    assert _rate(flags) >= 0.95, f"accuracy on blurred, noisy, colour-shifted images: {_rate(flags):.3f}"


# ------------------------------------------------------------------------------------ scorer: rejection
def _near_miss(spec: ShapeSpec, attribute: str, rng: np.random.Generator) -> ShapeSpec:
    values = {"colour": tuple(COLOURS), "shape": SHAPES, "position": POSITIONS}[attribute]
    other = rng.choice([value for value in values if value != getattr(spec, attribute)])
    return dataclasses.replace(spec, **{attribute: str(other)})


@pytest.mark.parametrize("attribute", ["colour", "shape", "position"])
def test_scorer_rejects_near_misses(train32, attribute: str) -> None:
    _, specs, detections = train32
    rng = np.random.default_rng(1)
    rate = _rejected(detections, [_near_miss(spec, attribute, rng) for spec in specs])
    assert rate >= FLOOR, f"rejection of captions with another {attribute} only: {rate:.3f}"


def test_scorer_rejects_captions_of_other_items(train32) -> None:
    _, specs, detections = train32
    rng = np.random.default_rng(2)
    wrong = []
    for spec in specs:
        while True:  # another item whose caption differs in colour, shape or position
            other = ShapeSpec.from_label(int(rng.integers(NUM_LABELS)))
            if (other.colour, other.shape, other.position) != (spec.colour, spec.shape, spec.position):
                break
        wrong.append(other)
    rate = _rejected(detections, wrong)
    assert rate >= FLOOR, f"rejection of mismatched captions: {rate:.3f}"


def _blank_images() -> list[np.ndarray]:
    levels = [255, 245, 230, 200, 128, 60, 0]
    blanks = [np.full((32, 32, 3), level, np.uint8) for level in levels]
    return blanks + [np.full((32, 32, 3), rgb, np.uint8) for rgb in COLOURS.values()]


def _blobs(rng: np.random.Generator) -> np.ndarray:
    image = Image.new("RGB", (32, 32), "white")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(1, 5))):
        x, y = rng.uniform(-4, 30, size=2)
        colour = tuple(rng.integers(0, 256, 3).tolist())
        draw.ellipse([x, y, x + rng.uniform(3, 16), y + rng.uniform(3, 16)], fill=colour)
    return np.asarray(image)


def _noise_images(kind: str, count: int, rng: np.random.Generator) -> list[np.ndarray]:
    def one() -> np.ndarray:
        if kind == "uniform":
            return rng.uniform(0, 1, (32, 32, 3))
        if kind == "gaussian":
            return np.clip(rng.uniform(0.2, 1.0) + rng.normal(0, rng.uniform(0.05, 0.5), (32, 32, 3)), 0, 1)
        if kind == "salt_and_pepper":
            image = np.full((32, 32, 3), rng.choice([1.0, 0.5]))
            flips = rng.uniform(size=(32, 32)) < rng.uniform(0.02, 0.5)
            image[flips] = rng.choice([0.0, 1.0], size=(int(flips.sum()), 1))
            return image
        if kind == "smooth":  # low-frequency colour noise: large soft patches
            coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8))
            return np.asarray(coarse.resize((32, 32), Image.BILINEAR), dtype=np.float32) / 255
        return _blobs(rng) / 255.0

    return [(one() * 255).round().astype(np.uint8) for _ in range(count)]


def test_scorer_rejects_blank_images() -> None:
    captions = _random_specs(40, seed=3)
    detections = [detect(Image.fromarray(blank)) for blank in _blank_images()]
    assert all(detection == Detection() for detection in detections), detections
    rate = _rate([not compare(d, spec).correct for d in detections for spec in captions])
    assert rate >= FLOOR, f"rejection of blank images: {rate:.3f}"


@pytest.mark.parametrize("kind", ["uniform", "gaussian", "salt_and_pepper", "smooth", "blobs"])
def test_scorer_rejects_noise_images(kind: str) -> None:
    rng = np.random.default_rng(4)
    images = _noise_images(kind, 300, rng)
    rate = _rejected([detect(Image.fromarray(image)) for image in images], _random_specs(300, seed=5))
    assert rate >= FLOOR, f"rejection of {kind} noise images against random captions: {rate:.3f}"


def test_scorer_rejects_images_with_two_shapes() -> None:
    rng, flags = np.random.default_rng(6), []
    while len(flags) < 200:
        first, second = _random_specs(2, seed=int(rng.integers(1 << 30)))
        if first.position != second.position:
            image = ImageChops.darker(render(first, 32, rng), render(second, 32, rng))
            detection = detect(image)
            flags.append(not compare(detection, first).correct and not compare(detection, second).correct)
    assert _rate(flags) >= FLOOR, f"rejection of two-shape images against either caption: {_rate(flags):.3f}"


def test_prompt_accuracy_reports_fractions(train32) -> None:
    images, specs, _ = train32
    shifted = specs[1:20] + specs[:1]
    accuracy = prompt_accuracy(list(images[:20]), [spec.caption for spec in shifted])
    assert all(0.0 <= value <= 1.0 for value in accuracy.values())
    assert accuracy["correct"] <= 0.1, accuracy
    with pytest.raises(ValueError):
        prompt_accuracy(images[:2], ["a small red circle at the top"])


def test_scorer_runs_on_tiny_and_large_images() -> None:
    for resolution in (16, 256):
        image = pil_to_tensor(render(ShapeSpec("blue", "square", "large", "center"), resolution))
        assert isinstance(score_image(image, "a large blue square in the center"), ShapeScore)

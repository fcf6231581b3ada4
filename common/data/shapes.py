"""Procedural coloured shapes with captions, and an analytic scorer of caption faithfulness.

Every image holds one filled shape (6 colours x 3 shapes x 2 sizes x 9 grid cells) on white.
Because the generator is known, a generated image can be checked against its prompt by
measuring the shape's colour, form, size and grid cell: the project's text-alignment metric.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Sequence, Union

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor
from torch.utils.data import Dataset

from common.images import pil_to_tensor

# Saturated colours >= 95 RGB units apart (yellow-orange is the closest pair), so blends with the
# white background and mild colour drift stay unambiguous.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 25, 25),
    "green": (30, 165, 45),
    "blue": (30, 70, 225),
    "yellow": (240, 220, 0),
    "purple": (140, 35, 185),
    "orange": (250, 125, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)
NUM_LABELS = len(COLOURS) * len(SHAPES) * len(SIZES) * len(POSITIONS)
SPLITS: tuple[str, ...] = ("train", "heldout", "all")

_COLOUR_NAMES = tuple(COLOURS)
_PALETTE = np.array([COLOURS[name] for name in _COLOUR_NAMES], dtype=np.float32) / 255.0
_SIDE = {"small": 0.6, "large": 0.9}  # shape side as a fraction of the grid cell (a 32 px small square is 6 px)
_FILL = {"circle": math.pi / 4, "square": 1.0, "triangle": 0.5}  # area / bounding-box area
_JITTER = 0.4  # centre jitter as a fraction of the free margin, so shapes stay inside their cell
_SPLIT_STREAM = {"train": 0, "all": 0, "heldout": 1}  # heldout draws from its own seed stream
_CAPTION = re.compile(
    r"an? (?P<size>{}) (?P<colour>{}) (?P<shape>{}) (?:at|in|on) the (?P<position>{})".format(
        *("|".join(sorted(names, key=len, reverse=True)) for names in (SIZES, _COLOUR_NAMES, SHAPES, POSITIONS))
    )
)


@dataclass(frozen=True)
class ShapeSpec:
    """The attributes of one shapes image; ``label`` enumerates all 324 combinations."""

    colour: str
    shape: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for value, allowed in ((self.colour, _COLOUR_NAMES), (self.shape, SHAPES), (self.size, SIZES),
                               (self.position, POSITIONS)):
            if value not in allowed:
                raise ValueError(f"unknown shape attribute {value!r}; expected one of {allowed}")

    @property
    def caption(self) -> str:
        """English caption, e.g. ``a small red circle at the top left``."""
        preposition = "in" if self.position == "center" else "at"
        return f"a {self.size} {self.colour} {self.shape} {preposition} the {self.position}"

    @property
    def label(self) -> int:
        """Integer in ``[0, NUM_LABELS)`` encoding colour, shape, size and position."""
        index = _COLOUR_NAMES.index(self.colour)
        index = index * len(SHAPES) + SHAPES.index(self.shape)
        index = index * len(SIZES) + SIZES.index(self.size)
        return index * len(POSITIONS) + POSITIONS.index(self.position)

    @classmethod
    def from_label(cls, label: int) -> ShapeSpec:
        """Inverse of ``label``."""
        if not 0 <= label < NUM_LABELS:
            raise ValueError(f"shape label {label} is outside [0, {NUM_LABELS})")
        rest, position = divmod(int(label), len(POSITIONS))
        rest, size = divmod(rest, len(SIZES))
        colour, shape = divmod(rest, len(SHAPES))
        return cls(_COLOUR_NAMES[colour], SHAPES[shape], SIZES[size], POSITIONS[position])


def parse_caption(caption: str) -> ShapeSpec:
    """Parse a caption written by ``ShapeSpec.caption`` (case, spacing, 'centre' and a final '.' are tolerated).

    Raises:
        ValueError: if the caption does not name one size, colour, shape and position.
    """
    text = " ".join(caption.lower().replace("centre", "center").split()).rstrip(".").strip()
    match = _CAPTION.fullmatch(text)
    if match is None:
        raise ValueError(f"cannot parse shapes caption {caption!r}")
    return ShapeSpec(match["colour"], match["shape"], match["size"], match["position"])


def render(spec: ShapeSpec, resolution: int, rng: np.random.Generator | None = None) -> Image.Image:
    """Draw ``spec`` as an anti-aliased RGB image; ``rng`` jitters the centre within its cell (None: no jitter)."""
    scale = max(4, 256 // resolution)  # supersample, then box-filter down: exact area anti-aliasing
    cell = resolution / 3
    side = _SIDE[spec.size] * cell
    row, column = divmod(POSITIONS.index(spec.position), 3)
    jitter = _JITTER * (cell - side) / 2
    dx, dy = rng.uniform(-jitter, jitter, size=2) if rng is not None else (0.0, 0.0)
    cx, cy, half = ((column + 0.5) * cell + dx) * scale, ((row + 0.5) * cell + dy) * scale, side * scale / 2
    canvas = Image.new("RGB", (resolution * scale,) * 2, "white")
    draw, colour = ImageDraw.Draw(canvas), COLOURS[spec.colour]
    if spec.shape == "circle":
        draw.ellipse([cx - half, cy - half, cx + half - 1, cy + half - 1], fill=colour)
    elif spec.shape == "square":
        draw.rectangle([cx - half, cy - half, cx + half - 1, cy + half - 1], fill=colour)
    else:  # isosceles, apex up, base = height = side
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=colour)
    return canvas.resize((resolution, resolution), Image.BOX)


def evaluation_prompts(count: int = 64, seed: int = 0) -> list[str]:
    """A fixed, distinct sample of captions; with ``count >= 9`` it names every colour, shape, size and position."""
    if not 0 < count <= NUM_LABELS:
        raise ValueError(f"count must be in [1, {NUM_LABELS}], got {count}")
    order = [ShapeSpec.from_label(int(i)) for i in np.random.default_rng(seed).permutation(NUM_LABELS)]
    seen: set[tuple[str, str]] = set()
    chosen: list[ShapeSpec] = []
    for spec in order:  # first take specs that show an attribute value not yet covered
        values = {("colour", spec.colour), ("shape", spec.shape), ("size", spec.size), ("position", spec.position)}
        if not values <= seen:
            seen |= values
            chosen.append(spec)
    chosen += [spec for spec in order if spec not in chosen]
    return [spec.caption for spec in chosen[:count]]


class ShapesDataset(Dataset):
    """Deterministic procedural shapes: item ``i`` depends only on ``(seed, split, i)``.

    Items are ``{"image": (3, R, R) float in [-1, 1], "caption": str, "label": int}``. ``len`` is ``size``
    but every non-negative index is valid; ``heldout`` draws from a seed stream disjoint from ``train``
    (``all`` is the train stream).
    """

    def __init__(self, resolution: int = 32, size: int = 10_000, seed: int = 0, split: str = "train") -> None:
        if split not in SPLITS:
            raise ValueError(f"unknown shapes split {split!r}; expected one of {SPLITS}")
        if resolution < 8 or size < 0 or seed < 0:
            raise ValueError(f"need resolution >= 8, size >= 0, seed >= 0; got {resolution}, {size}, {seed}")
        self.resolution, self.size, self.seed, self.split = resolution, size, seed, split

    def __len__(self) -> int:
        return self.size

    def _rng(self, index: int) -> np.random.Generator:
        if index < 0:
            raise IndexError(f"shapes index must be non-negative, got {index}")
        return np.random.default_rng([self.seed, _SPLIT_STREAM[self.split], index])

    def spec(self, index: int) -> ShapeSpec:
        """The attributes of item ``index``, without rendering it."""
        return ShapeSpec.from_label(int(self._rng(index).integers(NUM_LABELS)))

    def __getitem__(self, index: int) -> dict[str, Tensor | str | int]:
        rng = self._rng(int(index))
        spec = ShapeSpec.from_label(int(rng.integers(NUM_LABELS)))  # same draw order as ``spec``
        image = pil_to_tensor(render(spec, self.resolution, rng))
        return {"image": image, "caption": spec.caption, "label": spec.label}


# ----------------------------------------------------------------------------------------- scorer
ImageLike = Union[Tensor, Image.Image, np.ndarray]
_WORK_SIZE = 64  # larger images are box-downsampled first: shape cues survive and scoring stays fast
_FOREGROUND = 0.25  # distance from white (RGB in [0, 1]) above which a pixel is ink
_BACKGROUND = 0.2  # distance from white below which a pixel counts as background
_MIN_BACKGROUND = 0.7  # fraction of near-white pixels an image needs (rejects blanks and noise)
_MIN_SHARE = 0.9  # fraction of all ink the shape must hold (rejects clutter and a second shape)
_MAX_RESIDUAL = 0.2  # RGB distance of the shape's colour from the nearest palette-with-white blend
_MIN_OPACITY = 0.3  # the shape's most inked pixels must be at least this far from white to its colour
_SKEW = 0.2  # vertical skew separating triangles (< -0.24 even blurred) from symmetric shapes (~0)
_DEAD_BAND = 0.1  # opacities below this count as background, above 1 - this as solid
_AREA_RANGE = (0.04, 1.2)  # shape area in grid cells; small triangle ~0.18, large square ~0.81
_SIZE_SPLIT = math.sqrt(_SIDE["small"] * _SIDE["large"])


@dataclass(frozen=True)
class Detection:
    """What the scorer sees: each attribute is None when no single plausible shape was found."""

    colour: str | None = None
    shape: str | None = None
    size: str | None = None
    position: str | None = None


@dataclass(frozen=True)
class ShapeScore:
    """Per-attribute agreement of an image with its caption; size is reported but not part of ``correct``."""

    colour_ok: bool
    shape_ok: bool
    position_ok: bool
    size_ok: bool

    @property
    def correct(self) -> bool:
        """Colour, shape and position all match the caption."""
        return self.colour_ok and self.shape_ok and self.position_ok


def _as_array(image: ImageLike) -> np.ndarray:
    """(H, W, 3) float RGB in [0, 1], downsampled to at most ``_WORK_SIZE`` pixels a side."""
    if isinstance(image, Tensor):
        image = image.detach().float().cpu().reshape(-1, *image.shape[-2:])[:3]
        array = ((image.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy()
    elif isinstance(image, Image.Image):
        array = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    else:
        array = np.asarray(image)
        array = array.astype(np.float32) / (255.0 if np.issubdtype(array.dtype, np.integer) else 1.0)
    if array.shape[-1] == 1:  # grey tensor: treat as RGB
        array = np.repeat(array, 3, axis=-1)
    height, width = array.shape[:2]
    if max(height, width) > _WORK_SIZE:
        scale = _WORK_SIZE / max(height, width)
        pil = Image.fromarray((array * 255).round().astype(np.uint8))
        pil = pil.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.BOX)
        array = np.asarray(pil, dtype=np.float32) / 255.0
    return array


def _filter3(array: np.ndarray, reduce: np.ufunc, fill: float) -> np.ndarray:
    """3x3 min or max filter (separable), padding with ``fill``."""
    padded = np.pad(array, 1, constant_values=fill)
    rows = reduce(reduce(padded[:-2], padded[1:-1]), padded[2:])
    return reduce(reduce(rows[:, :-2], rows[:, 1:-1]), rows[:, 2:])


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """Boolean mask of the largest 8-connected component of ``mask`` (scipy is not a dependency)."""
    sentinel = mask.size
    labels = np.where(mask, np.arange(mask.size).reshape(mask.shape), sentinel)
    while True:
        spread = np.where(mask, _filter3(labels, np.minimum, sentinel), sentinel)
        flat = np.append(spread.ravel(), sentinel)
        spread = flat[spread]  # pointer jumping: follow each label to its own label, so few sweeps converge
        if np.array_equal(spread, labels):
            break
        labels = spread
    values, counts = np.unique(labels[mask], return_counts=True)
    return labels == values[np.argmax(counts)]


def _cumulant4(mask: np.ndarray, offsets: np.ndarray, area: float) -> float:
    """Fourth cumulant of the mask's mass along ``offsets`` (distances from the centroid), divided by area^2."""
    second = float((mask * offsets**2).sum()) / area
    return (float((mask * offsets**4).sum()) / area - 3 * second**2) / area**2


def _classify_shape(mask: np.ndarray, area: float, cy: float, cx: float) -> str | None:
    """Circle, square or triangle from moments of the soft mask (None when it is none of them).

    Shapes are axis-aligned, so three cues suffice: vertical skew (an apex-up triangle's mass sits low,
    skew -0.57 sharp), "cornerness" (a square's fourth cumulant is twice as negative along the axes as
    along the diagonals, a circle's is isotropic; cumulants of order > 2 are unchanged by Gaussian blur,
    so this survives blurry samples) and fill of the box spanned by the widest row and tallest column.
    """
    height, width = mask.sum(axis=0).max(), mask.sum(axis=1).max()
    if not 0.77 < height / width < 1.3:
        return None  # every shape in the data is as wide as it is tall
    fill = area / (height * width)
    dy, dx = np.ogrid[: mask.shape[0], : mask.shape[1]]
    dy, dx = dy + 0.5 - cy, dx + 0.5 - cx
    skew = float((mask * dy**3).sum()) / area / (float((mask * dy**2).sum()) / area) ** 1.5
    diagonal = _cumulant4(mask, (dx + dy) / math.sqrt(2), area) + _cumulant4(mask, (dx - dy) / math.sqrt(2), area)
    corners = 500 * (diagonal - _cumulant4(mask, dx, area) - _cumulant4(mask, dy, area))  # square 4.2, circle 0
    if skew < -_SKEW:
        return "triangle" if fill < 1.3 else None
    if skew > _SKEW or not 0.65 < fill < 1.15:
        return None
    # both cues vote; each is scaled by its gap between sharp circles and sharp squares
    return "square" if (corners - 2.1) / 2.1 + (fill - 0.9) / 0.1 > 0 else "circle"


def _fit_palette(colour: np.ndarray) -> tuple[int, float, float]:
    """Palette colour whose blend with white best explains ``colour``: (index, residual, opacity)."""
    towards = _PALETTE - 1.0
    opacity = np.clip(towards @ (colour - 1.0) / (towards**2).sum(axis=-1), 0.0, 1.0)
    residual = np.linalg.norm(colour - 1.0 - opacity[:, None] * towards, axis=-1)
    best = int(residual.argmin())
    return best, float(residual[best]), float(opacity[best])


def _box3(pixels: np.ndarray) -> np.ndarray:
    """3x3 mean of an (H, W, C) image, edge-padded."""
    padded = np.pad(pixels, ((1, 1), (1, 1), (0, 0)), mode="edge")
    height, width = pixels.shape[:2]
    return sum(padded[i:i + height, j:j + width] for i in range(3) for j in range(3)) / 9


def _find_shape(pixels: np.ndarray) -> np.ndarray | None:
    """Mask of the one shape on a near-white background, or None if the image is not one."""
    # decide on a 3x3-smoothed copy: pixel noise of generated images must not look like ink
    distance = np.linalg.norm(1.0 - _box3(pixels), axis=-1)
    ink = distance > _FOREGROUND
    if (distance < _BACKGROUND).mean() < _MIN_BACKGROUND or not ink.any():
        return None
    component = _largest_component(ink)
    return component if component.sum() >= _MIN_SHARE * ink.sum() else None


def detect(image: ImageLike) -> Detection:
    """Find the one shape on a white background and measure its attributes (all None if there is none)."""
    pixels = _as_array(image)
    component = _find_shape(pixels)
    if component is None:
        return Detection()
    # the most inked pixels give the shape's colour, free of anti-aliased or blurred edges
    distance = np.linalg.norm(1.0 - pixels, axis=-1)
    colour = pixels[component & (distance >= 0.75 * distance[component].max())].mean(axis=0)
    index, residual, opacity = _fit_palette(colour)
    matched = residual < _MAX_RESIDUAL and opacity > _MIN_OPACITY
    # soft coverage: each pixel's opacity towards the palette colour (blur conserves its sum)
    direction = (_PALETTE[index] if matched else colour) - 1.0
    alpha = ((pixels - 1.0) @ direction) / max(float(direction @ direction), 1e-6)
    # a little dead band on both ends keeps pixel noise in the background ring out of the moments
    alpha = np.clip((alpha - _DEAD_BAND) / (1 - 2 * _DEAD_BAND), 0.0, 1.0)
    mask = alpha * _filter3(component, np.maximum, False)
    height, width = mask.shape
    area, cell_area = float(mask.sum()), height * width / 9
    if not _AREA_RANGE[0] < area / cell_area < _AREA_RANGE[1]:
        return Detection()
    ys, xs = np.arange(height) + 0.5, np.arange(width) + 0.5
    cy, cx = float(mask.sum(axis=1) @ ys) / area, float(mask.sum(axis=0) @ xs) / area
    row, column = min(int(cy * 3 / height), 2), min(int(cx * 3 / width), 2)
    shape = _classify_shape(mask, area, cy, cx)
    side = math.sqrt(area / _FILL.get(shape, 0.75) / cell_area)
    return Detection(
        colour=_COLOUR_NAMES[index] if matched else None,
        shape=shape,
        size="small" if side < _SIZE_SPLIT else "large",
        position=POSITIONS[row * 3 + column],
    )


def compare(detection: Detection, spec: ShapeSpec) -> ShapeScore:
    """Score a detection against the attributes a caption names."""
    return ShapeScore(
        colour_ok=detection.colour == spec.colour,
        shape_ok=detection.shape == spec.shape,
        position_ok=detection.position == spec.position,
        size_ok=detection.size == spec.size,
    )


def score_image(image: ImageLike, caption: str) -> ShapeScore:
    """Does ``image`` show what ``caption`` says?

    Args:
        image: (3, H, W) tensor in [-1, 1] (or a batch of one), PIL image, or (H, W, 3) array; >= 16 px.
        caption: a caption in the dataset's grammar.

    Raises:
        ValueError: if the caption cannot be parsed.
    """
    return compare(detect(image), parse_caption(caption))


def prompt_accuracy(images: Tensor | Sequence[ImageLike], captions: Sequence[str]) -> dict[str, float]:
    """Fractions of images whose detection matches their caption: correct, colour, shape, position, size."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    scores = [score_image(image, caption) for image, caption in zip(images, captions)]
    count = max(len(scores), 1)
    fields = {"correct": "correct", "colour": "colour_ok", "shape": "shape_ok", "position": "position_ok",
              "size": "size_ok"}
    return {key: sum(getattr(score, field) for score in scores) / count for key, field in fields.items()}


__all__ = [
    "COLOURS", "SHAPES", "SIZES", "POSITIONS", "NUM_LABELS", "ShapeSpec", "parse_caption", "render",
    "evaluation_prompts", "ShapesDataset", "Detection", "ShapeScore", "detect", "compare", "score_image",
    "prompt_accuracy",
]

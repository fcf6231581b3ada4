"""The settings inside every PNG written, and the call that makes its pixels again.

    python -m pipelines.generate runs/emoji32_diffusion "a dog" -n 4 --seed 0 -o grid.png
    python -m pipelines.generate --from-png grid.png -o again.png      # the same pixels, bit for bit

The command line, the demo and the web app write one PNG text chunk named ``parameters`` (a tEXt chunk,
``Image.open(path).text["parameters"]``) holding one JSON object, ASCII-escaped::

    {"format": "latentgen.parameters/1",
     "pipeline": {"name": "emoji32_diffusion", "path": "/abs/runs/emoji32_diffusion", "hash": "9c1e...",
                  "class": "TextToImage"},
     "prompts": ["a dog"],                       # class ids or names for ClassToImage
     "options": {"num_inference_steps": 20, "guidance_scale": 4.0, "sampler": "dpmpp_2m", "seed": 0, ...},
     "size": [32, 32],                           # height and width of each image, in pixels
     "image": null, "mask": null,                # the input files of image-to-image and inpainting
     "precision": "auto", "lora": null, "lora_scale": 1.0,
     "layout": {"columns": 4, "scale": 1, "labels": false, "index": null}}

``options`` is :meth:`pipelines.options.GenerationOptions.report` of the call (defaults resolved), so a new
option is recorded, and passed back, without a change here. ``pipeline.hash`` is the first 16 hex digits
of the SHA-256 of every file in the pipeline directory (weights and configs, by relative path), computed
once per directory and cached while its files are unchanged. ``layout`` says what the PNG shows: a grid
of the call's images (``columns`` per row, upscaled ``scale`` times, prompts left of the rows when
``labels``) or one image of the call (``index``). Regenerating repeats the whole call, so the images are
the same bit for bit on the same machine (same device and precision).
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image, PngImagePlugin

from common.images import label_rows, make_grid, pil_to_tensor
from common.integrity import update_with_file
from pipelines.base import Pipeline, resolve
from pipelines.image_to_image import ImageToImage, Inpaint
from pipelines.loading import load_pipeline
from pipelines.options import GenerationOptions

FORMAT = "latentgen.parameters/1"
KEY = "parameters"
HASH_DIGITS = 16
# The task recorded -> the pipeline class made from the directory's default one (token priors give their
# token variants: ImageToImage.from_pipe(TokensToImage) is TokenImageToImage).
EDITORS: dict[str, type[ImageToImage] | type[Inpaint]] = {
    "ImageToImage": ImageToImage, "TokenImageToImage": ImageToImage, "Inpaint": Inpaint, "TokenInpaint": Inpaint}
DEFAULT_TASKS = ("TextToImage", "ClassToImage", "TokensToImage")


class ParametersError(ValueError):
    """A PNG without usable settings, or one made by another pipeline than the one given."""


@dataclass(frozen=True)
class PipelineIdentity:
    """Which pipeline made an image.

    Attributes:
        name: the name of the directory given (a training run or a pipeline directory).
        path: that directory, absolute.
        hash: the first :data:`HASH_DIGITS` hex digits of the SHA-256 of the pipeline directory's files.
    """

    name: str
    path: str
    hash: str


@dataclass(frozen=True)
class Layout:
    """What the PNG shows of a call's images.

    Attributes:
        columns: images per grid row (the CLI's ``-n``).
        scale: the grid is upscaled this many times (nearest neighbour).
        labels: the prompts are written left of the grid's rows (the demo's grids).
        index: one image of the call (the app), instead of a grid.
    """

    columns: int = 1
    scale: int = 1
    labels: bool = False
    index: int | None = None


@dataclass(frozen=True)
class Parameters:
    """Everything that made a PNG's pixels: the pipeline, the call, and how the images were laid out.

    Attributes:
        pipeline: the pipeline's identity.
        task: the pipeline class that ran ("TextToImage", "ClassToImage", "ImageToImage", "Inpaint",
            "TokensToImage", "TokenImageToImage", "TokenInpaint").
        prompts: the prompts, or the class labels (ids or names) of ClassToImage.
        options: the call's checked settings (:meth:`pipelines.options.GenerationOptions.report`).
        size: (height, width) of each image in pixels.
        layout: grid or single image.
        image, mask: the input image and mask files (absolute) of image-to-image and inpainting.
        precision: the precision requested ("auto", "fp32", "bf16", "fp16").
        lora, lora_scale: the LoRA adapter sampled with, and its scale.
    """

    pipeline: PipelineIdentity
    task: str
    prompts: list[Any]
    options: dict[str, Any]
    size: tuple[int, int]
    layout: Layout = field(default_factory=Layout)
    image: str | None = None
    mask: str | None = None
    precision: str = "auto"
    lora: str | None = None
    lora_scale: float = 1.0

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, **dataclasses.asdict(self), "pipeline": {
            **dataclasses.asdict(self.pipeline), "class": self.task}}, default=str)

    @classmethod
    def from_json(cls, text: str, source: str) -> Parameters:
        """Parse a ``parameters`` chunk (``source`` names the PNG in errors)."""
        try:
            record = json.loads(text)
        except json.JSONDecodeError:
            record = None
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise ParametersError(f"{source}: its parameters chunk is not latentgen's ({FORMAT}); it was not written "
                                  f"by pipelines.generate, pipelines.demo or pipelines.app")
        try:
            identity = dict(record["pipeline"])
            task = identity.pop("class")
            return cls(PipelineIdentity(**identity), task, list(record["prompts"]), dict(record["options"]),
                       tuple(record["size"]), Layout(**record["layout"]), record["image"], record["mask"],
                       record["precision"], record["lora"], record["lora_scale"])
        except (KeyError, TypeError, ValueError) as error:
            raise ParametersError(f"{source}: its parameters chunk is incomplete ({error!r}); it cannot be "
                                  f"regenerated") from None


# ------------------------------------------------------------------------------------------ identity
_HASHES: dict[tuple, str] = {}
_LOCK = threading.Lock()


def weights_hash(directory: Path) -> str:
    """The SHA-256 (first :data:`HASH_DIGITS` hex digits) of a pipeline directory's files: relative paths
    and contents, hidden files left out. Cached while no file's size or modification time changes."""
    files = sorted(p for p in directory.rglob("*")
                   if p.is_file() and not any(part.startswith(".") for part in p.relative_to(directory).parts))
    key = (str(directory.resolve()), tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files))
    with _LOCK:
        if key not in _HASHES:
            digest = hashlib.sha256()
            for path in files:
                digest.update(path.relative_to(directory).as_posix().encode() + b"\0")
                update_with_file(digest, path)
            _HASHES[key] = digest.hexdigest()[:HASH_DIGITS]
        return _HASHES[key]


def identify(path: str | Path) -> PipelineIdentity:
    """The identity of the pipeline in ``path`` (a training run or pipeline directory)."""
    directory, _, _ = resolve(path)
    return PipelineIdentity(Path(path).resolve().name, str(Path(path).resolve()), weights_hash(directory))


# ------------------------------------------------------------------------------------------ PNG files
def png_bytes(image: Image.Image, parameters: Parameters) -> bytes:
    """``image`` encoded as PNG with ``parameters`` in its ``parameters`` text chunk."""
    info = PngImagePlugin.PngInfo()
    info.add_text(KEY, parameters.to_json())
    data = io.BytesIO()
    image.save(data, format="PNG", pnginfo=info)
    return data.getvalue()


def save_png(image: Image.Image, path: str | Path, parameters: Parameters) -> Path:
    """Write ``image`` with its parameters chunk to ``path`` (folders made as needed)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(image, parameters))
    return path


def read_parameters(path: str | Path) -> Parameters:
    """The parameters of a PNG written by latentgen; a clear :class:`ParametersError` otherwise."""
    try:
        with Image.open(path) as image:
            text = getattr(image, "text", {}).get(KEY) if image.format == "PNG" else None
            kind = image.format
    except (OSError, ValueError) as error:
        raise ParametersError(f"{path}: cannot be read as an image ({error})") from None
    if kind != "PNG":
        raise ParametersError(f"{path} is a {kind} file; --from-png reads the PNGs that latentgen writes")
    if text is None:
        raise ParametersError(f"{path} has no {KEY!r} text chunk, so its settings are unknown; only PNGs written by "
                              f"pipelines.generate, pipelines.demo or pipelines.app (or saved from the app) have one")
    return Parameters.from_json(text, str(path))


# ------------------------------------------------------------------------------------------ the call
def open_task(base: Pipeline, task: str) -> Pipeline:
    """The pipeline class ``task`` over a loaded default pipeline's components (no reload)."""
    if task in EDITORS:
        return EDITORS[task].from_pipe(base)
    if task != type(base).__name__:
        raise ParametersError(f"the image was made by {task}, and the pipeline directory holds a "
                              f"{type(base).__name__} pipeline; pass --path to the pipeline that made it")
    return base


def check_identity(parameters: Parameters, path: str | Path | None = None) -> PipelineIdentity:
    """The identity of the pipeline to regenerate with (``path``, else the one recorded), refused unless its
    hash is the recorded one."""
    recorded = parameters.pipeline
    where = Path(path if path is not None else recorded.path)
    if not where.exists():
        raise ParametersError(f"the pipeline directory {where} ({'--path' if path else 'recorded in the PNG'}) does "
                              f"not exist; pass --path to the pipeline {recorded.name!r} (hash {recorded.hash})")
    found = identify(where)
    if found.hash != recorded.hash:
        raise ParametersError(f"the pipeline in {where} has hash {found.hash}, and the PNG was made by "
                              f"{recorded.name!r} with hash {recorded.hash}: other weights give other images; pass "
                              f"--path to the pipeline that made it")
    return found


def call(pipe: Pipeline, parameters: Parameters, progress: bool = False,
         callback: Callable[..., None] | None = None) -> list[Image.Image]:
    """Run the call that ``parameters`` record on ``pipe`` (the recorded task); returns its PIL images."""
    options = dict(parameters.options, output_type="pil", progress=progress)
    if callback is not None:
        options["callback"] = callback
    positional: list[Any] = [parameters.prompts]
    for name in ("image", "mask"):
        value = getattr(parameters, name)
        if value is not None:
            if not Path(value).is_file():
                raise ParametersError(f"the input {name} {value} recorded in the PNG does not exist; the call "
                                      f"cannot be repeated without it")
            with Image.open(value) as opened:
                positional.append(opened.copy())
    return pipe(*positional, **options).images


def render(images: list[Image.Image], parameters: Parameters) -> Image.Image:
    """What the PNG shows: one image of the call, or the grid of them all."""
    layout = parameters.layout
    if layout.index is not None:
        return images[layout.index]
    grid = make_grid(torch.stack([pil_to_tensor(image) for image in images]), layout.columns)
    if layout.scale > 1:
        grid = grid.resize((grid.width * layout.scale, grid.height * layout.scale), Image.NEAREST)
    if layout.labels:
        grid = label_rows(grid, [str(p) for p in parameters.prompts], math.ceil(len(images) / layout.columns))
    return grid


def regenerate(parameters: Parameters, path: str | Path | None = None, device: str = "cpu",
               progress: bool = False) -> tuple[Image.Image, Parameters]:
    """Make a PNG's image again: the recorded pipeline (or ``path``, with the same hash), the recorded call.

    Returns the image and its parameters (with the identity of the directory used).
    """
    identity = check_identity(parameters, path)
    pipe = open_task(load_pipeline(identity.path), parameters.task)
    if parameters.lora is not None:
        pipe.load_lora(parameters.lora, scale=parameters.lora_scale)
    pipe = pipe.to(device, precision=parameters.precision)
    images = call(pipe, parameters, progress)
    return render(images, parameters), dataclasses.replace(parameters, pipeline=identity)


def recorded_options(given: dict[str, Any], report: dict[str, Any]) -> dict[str, Any]:
    """The options to record for a call: its report (defaults resolved) over the options given, so that one
    the report leaves out but the pipeline uses (a MaskGIT prior's ``num_inference_steps``) is kept too;
    how the call ran (``progress``, ``output_type``, ...) is not recorded."""
    kept = {f.name for f in dataclasses.fields(GenerationOptions) if f.metadata["report"]}
    return {**{name: value for name, value in given.items() if name in kept}, **report}

"""What the web app (:mod:`pipelines.app`) does, without gradio: its controls, its calls and its files.

The app's option controls come from :class:`pipelines.options.GenerationOptions`: every option the call
report lists (``report=True`` metadata) that applies to a tab's pipeline gets one, with the field's help,
bounds and type, so an option added there appears in the app without a change here. The controls that
the tabs lay out themselves (prompt, negative prompt, seed, size, images per prompt) are
:data:`PLACED`; classifier guidance (the ``steering`` role) needs a classifier directory and stays on the
command line and the Python API.

A request sends only the options whose control the user changed from its default, so the pipeline's
own defaults (and its checks, with its own error messages) apply to everything else. Each image is
written as a PNG with its settings (:mod:`pipelines.png_info`: the call and the image's index in it), so
``python -m pipelines.generate --from-png`` makes any image of the gallery again.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from diffusion.samplers import SAMPLERS
from pipelines.base import Pipeline
from pipelines.image_to_image import ImageToImage, Inpaint
from pipelines.latent import LatentPipeline
from pipelines.loading import load_pipeline
from pipelines.options import GenerationOptions
from pipelines.png_info import Layout, Parameters, PipelineIdentity, call, identify, recorded_options, save_png
from pipelines.text_to_image import ClassToImage

PLACED = frozenset({"negative_prompt", "height", "width", "seed", "num_images_per_prompt"})
HIDDEN_ROLES = frozenset({"steering"})
KINDS = ("int", "float", "str", "bool")
MAX_IMAGES = 16  # per request: a web page is not the place for bulk generation (use the command line)
MAX_SEED = 2**31 - 1


@dataclass(frozen=True)
class Control:
    """One option's control, read from a :class:`GenerationOptions` field.

    Attributes:
        name: the option's name (the call's keyword).
        help: the field's help line.
        kind: "int", "float", "str" or "bool", from the field's annotation.
        default: what the control shows first: the pipeline's resolved default, or None (empty: the
            pipeline's own default applies).
        minimum, maximum: the bounds (None / inf: none).
        choices: the valid values of a text option (samplers), or None.
    """

    name: str
    help: str
    kind: str
    default: Any
    minimum: float | None
    maximum: float
    choices: tuple[str, ...] | None = None

    @property
    def label(self) -> str:
        return self.name.replace("_", " ")

    def value(self, given: Any) -> Any:
        """A control's value as the call's keyword: None when empty; whole numbers as int for int options
        (a browser's number box sends 20.0); anything else as given, for the pipeline to check."""
        if given is None or (isinstance(given, str) and given.strip() == "" and self.kind != "str"):
            return None
        if self.kind == "int" and isinstance(given, float) and given.is_integer():
            return int(given)
        if self.kind == "float" and isinstance(given, int) and not isinstance(given, bool):
            return float(given)
        return given


def field_kind(annotation: Any) -> str | None:
    """The control kind of a field's annotation (its first type), or None for one the app cannot edit."""
    first = annotation.__name__ if isinstance(annotation, type) else str(annotation).split("|")[0].strip()
    return first if first in KINDS else None


def controls(pipe: Pipeline) -> list[Control]:
    """The option controls of a tab running ``pipe``, in the fields' order."""
    facts = pipe.facts
    defaults = pipe.options({}).report(facts)
    found = []
    for f in fields(GenerationOptions):
        meta, kind = f.metadata, field_kind(f.type)
        if (not meta["report"] or f.name in PLACED or kind is None or meta["only"] in HIDDEN_ROLES
                or (meta["only"] is not None and meta["only"] not in facts.roles)):
            continue
        default = defaults.get(f.name, f.default)
        if default is None:  # a token prior's saved sampling settings (temperature, top_k, ...)
            default = getattr(getattr(pipe.model, "sampling", None), f.name, None)
        maximum = meta["maximum"]
        if f.name == "num_inference_steps" and facts.num_train_timesteps is not None:
            maximum = facts.num_train_timesteps
        choices = tuple(sorted(SAMPLERS)) if f.name == "sampler" else meta.get("choices")
        found.append(Control(f.name, meta["help"], kind, default, meta["minimum"], maximum,
                             tuple(choices) if choices else None))
    return found


def call_options(tab_controls: list[Control], values: list[Any]) -> dict[str, Any]:
    """The options of a request: each control's value where the user changed it from its default."""
    options = {}
    for control, given in zip(tab_controls, values, strict=True):
        value = control.value(given)
        if value is not None and value != control.default:
            options[control.name] = value
    return options


# ------------------------------------------------------------------------------------------ tabs
@dataclass(frozen=True)
class Tab:
    """One tab: a task of a loaded pipeline.

    Attributes:
        title: the tab's title.
        pipe: the pipeline that runs it (over the entry's components).
        input: None, "image" (image-to-image) or "mask" (inpainting: an image and a mask drawn on it).
    """

    title: str
    pipe: Pipeline
    input: str | None = None

    @property
    def controls(self) -> list[Control]:
        return controls(self.pipe)

    @property
    def sized(self) -> bool:
        """Whether the tab offers height and width (diffusion pipelines; a token prior's size is fixed)."""
        return isinstance(self.pipe, LatentPipeline)

    @property
    def classes(self) -> list[str] | None:
        """The class choices of a class-to-image tab (names, or ids as text), None elsewhere."""
        if not isinstance(self.pipe, ClassToImage):
            return None
        names = self.pipe.class_names
        return [name if name is not None else str(i) for i, name in enumerate(names or [None] * self.pipe.num_classes)]


@dataclass
class Entry:
    """One pipeline the app offers, loaded once, with its tabs.

    Attributes:
        name: the directory's name (the dropdown's choice).
        identity: the pipeline's identity for the PNGs (its hash computed once, at load).
        tabs: the tasks the pipeline can do.
        precision: the precision requested for it.
        lock: serializes its generation, also outside gradio's queue.
    """

    name: str
    identity: PipelineIdentity
    tabs: list[Tab]
    precision: str = "auto"
    lock: threading.Lock = field(default_factory=threading.Lock)


def tabs_of(base: Pipeline) -> list[Tab]:
    """The tabs of a loaded pipeline: text (or class) to image, then image to image and inpainting where it
    has a text condition (a token prior gives the token editing pipelines)."""
    if isinstance(base, ClassToImage):
        return [Tab("Class to image", base)]
    first = "Text to image" if isinstance(base, LatentPipeline) else "Token generation"
    return [Tab(first, base), Tab("Image to image", ImageToImage.from_pipe(base), "image"),
            Tab("Inpainting", Inpaint.from_pipe(base), "mask")]


def load_entry(path: str | Path, device: str = "cpu", precision: str = "auto") -> Entry:
    """Load a pipeline (a training run or pipeline directory) for the app."""
    base = load_pipeline(path).to(device, precision=precision)
    identity = identify(path)
    return Entry(identity.name, identity, tabs_of(base), precision)


# ------------------------------------------------------------------------------------------ requests
@dataclass(frozen=True)
class Request:
    """What a tab sends.

    Attributes:
        prompt: the prompt, or the class (a name, or an id as text) on a class-to-image tab.
        negative_prompt: "" for none.
        seed: the seed; None or ``randomize``: a new one is drawn (and shown).
        images: images per prompt.
        height, width: the size (None: the pipeline's default or the input's).
        options: the option controls' values (:func:`call_options`).
        image, mask: the input image and mask of image-to-image and inpainting.
    """

    prompt: str
    negative_prompt: str = ""
    seed: int | None = None
    randomize: bool = False
    images: int = 1
    height: int | None = None
    width: int | None = None
    options: dict[str, Any] = field(default_factory=dict)
    image: Image.Image | None = None
    mask: Image.Image | None = None


@dataclass(frozen=True)
class Result:
    """What a request made: the images, their PNG files (settings inside) and the call's parameters."""

    images: list[Image.Image]
    files: list[Path]
    parameters: Parameters

    @property
    def seed(self) -> int:
        return self.parameters.options["seed"]


def request_options(tab: Tab, request: Request, seed: int) -> dict[str, Any]:
    """The call's keyword arguments of a request."""
    given = dict(request.options, num_images_per_prompt=request.images, seed=seed)
    if request.negative_prompt.strip() and "text" in tab.pipe.facts.roles:
        given["negative_prompt"] = request.negative_prompt
    for name in ("height", "width"):
        if getattr(request, name) is not None:
            given[name] = getattr(request, name)
    if tab.input is not None and not tab.sized:  # a token prior resizes its input to its fixed size
        given.update(height=tab.pipe.image_size, width=tab.pipe.image_size)
    return given


def prompt_of(tab: Tab, prompt: str) -> str | int:
    """The call's prompt: a class tab's id given as text is a class id."""
    if tab.classes is not None and prompt.strip().isdigit():
        return int(prompt)
    return prompt


def check_request(request: Request) -> None:
    """Refuse what the page cannot send to a pipeline (ValueError, shown in the page)."""
    if not 1 <= request.images <= MAX_IMAGES:
        raise ValueError(f"images per prompt must be in [1, {MAX_IMAGES}] in the app, got {request.images}; use "
                         f"python -m pipelines.generate -n for more")
    if request.seed is not None and not request.randomize and not 0 <= request.seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {request.seed}")


def store_input(image: Image.Image, folder: Path) -> str:
    """Save an input image (or mask) under ``folder/inputs`` by content hash; the PNGs refer to it there."""
    data = image.tobytes() + repr((image.mode, image.size)).encode()
    path = folder / "inputs" / f"{hashlib.sha256(data).hexdigest()[:16]}.png"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return str(path.resolve())


def generate(entry: Entry, tab: Tab, request: Request, folder: Path,
             progress: Callable[[int, int | None], None] | None = None) -> Result:
    """Run one request on a tab of a loaded pipeline and write each image as a PNG with its settings.

    Raises the pipeline's own ValueError / TypeError / CheckpointError for invalid settings, before anything
    is sampled.
    """
    check_request(request)
    seed = random.randrange(MAX_SEED) if request.randomize or request.seed is None else int(request.seed)
    given = request_options(tab, request, seed)
    pipe = tab.pipe
    with entry.lock:
        run = pipe.options(given)  # checked: the pipeline's own messages for bad settings
        options = recorded_options(given, run.report(pipe.facts))
        if tab.input is not None and request.image is None:
            raise ValueError("image: upload an image to start from")
        if tab.input == "mask" and request.mask is None:
            raise ValueError("mask: draw on the image the region to regenerate")
        inputs = {name: store_input(getattr(request, name), folder) for name in ("image", "mask")
                  if tab.input is not None and getattr(request, name) is not None}
        parameters = Parameters(entry.identity, type(pipe).__name__, [prompt_of(tab, request.prompt)], options, (0, 0),
                                Layout(), precision=entry.precision, **inputs)
        tokens = progress is not None and not isinstance(pipe, LatentPipeline)  # a tqdm bar instead of steps
        images = call(pipe, parameters, progress=tokens, callback=step_counter(pipe, run, progress))
    parameters = dataclasses.replace(parameters, size=(images[0].height, images[0].width))
    stem = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}-seed{seed}"  # unique under concurrency
    files = [save_png(image, folder / f"{stem}-{i}.png", dataclasses.replace(parameters, layout=Layout(index=i)))
             for i, image in enumerate(images)]
    return Result(images, files, parameters)


def step_counter(pipe: Pipeline, run: GenerationOptions,
                 progress: Callable[[int, int | None], None] | None) -> Callable[..., None] | None:
    """A sampler callback that reports (steps done, steps in all) to ``progress``; None where the pipeline
    takes no callback (a token prior samples tokens, not denoising steps)."""
    if progress is None or not isinstance(pipe, LatentPipeline):
        return None
    strength = 1.0 if run.strength is None else run.strength
    count = run.num_images_per_prompt  # one prompt per request
    total = pipe.steps_to_run(run, strength) * math.ceil(count / run.chunk_size)
    done = 0

    def report(*_: Any) -> None:
        nonlocal done
        done += 1
        progress(done, total)

    return report


def editor_inputs(value: dict[str, Any] | None) -> tuple[Image.Image | None, Image.Image | None]:
    """An image editor's value ({"background", "layers", "composite"}, numpy or PIL) -> the image and the mask
    of what was drawn on it (white where any layer is opaque), None for what is missing."""
    if not value or value.get("background") is None:
        return None, None
    background = as_pil(value["background"])
    drawn = np.zeros((background.height, background.width), dtype=bool)
    for layer in value.get("layers") or []:
        layer = as_pil(layer).convert("RGBA")
        if layer.size != background.size:
            layer = layer.resize(background.size, Image.NEAREST)
        drawn |= np.asarray(layer)[..., 3] > 0
    mask = Image.fromarray(drawn.astype(np.uint8) * 255, "L") if drawn.any() else None
    return background, mask


def as_pil(image: Any) -> Image.Image:
    """A PIL image from a PIL image or an (H, W[, C]) uint8 array."""
    return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))

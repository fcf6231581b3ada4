"""The call arguments every pipeline shares, checked in one place before any model runs.

Each check raises ValueError (a bad value) or TypeError (a wrong type) whose message starts with the
argument's name as the user wrote it, e.g. ``num_inference_steps must be >= 1, got 0``, so a mistake
costs no sampling time and needs no reading of tracebacks.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from numbers import Integral
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor

from diffusion.classifier import NoisyLatentClassifier
from diffusion.samplers import SIGMA_SPACING_SAMPLERS, Callback, get_sampler
from diffusion.schedules import SIGMA_SPACINGS

OUTPUT_TYPES = ("pil", "pt", "latent")


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` as an int >= ``minimum`` (bools are refused: ``True`` is not a step count)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_number(name: str, value: object, low: float, high: float = math.inf) -> float:
    """``value`` as a finite float in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or not low <= value <= high:
        bounds = f">= {low:g}" if high == math.inf else f"in [{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a finite number {bounds}, got {value}")
    return float(value)


def as_prompts(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
    """One prompt or a list of them as a non-empty list of strings ("" is the unconditional prompt)."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, Sequence):
        raise TypeError(f"{name} must be a string or a list of strings, got {prompt!r}")
    for i, item in enumerate(prompts):
        if not isinstance(item, str):
            raise TypeError(f"{name} must be a string or a list of strings; {name} {i} is "
                            f"{type(item).__name__}: {item!r}")
    if not prompts:
        raise ValueError(f"{name} is an empty list; give at least one prompt (\"\" is the unconditional prompt)")
    return list(prompts)


def as_negatives(negative_prompt: str | Sequence[str] | None, count: int) -> list[str] | None:
    """None, or 1 or ``count`` negative prompts (one is shared by every prompt)."""
    if negative_prompt is None:
        return None
    negatives = as_prompts(negative_prompt, "negative_prompt")
    if len(negatives) not in (1, count):
        raise ValueError(f"negative_prompt has {len(negatives)} entries for {count} prompts; give one, or one "
                         f"per prompt")
    return negatives


Labels = int | str | Sequence[int | str] | Tensor  # class ids, class names, or a list / (N,) tensor of them


def label_ids(name: str, labels: Labels, num_classes: int, class_names: Sequence[str | None] | None = None,
              owner: str = "this pipeline") -> Tensor:
    """Class ids or names -> a non-empty (N,) int64 tensor of ids in [0, num_classes).

    Args:
        name: the argument's name, which every error starts with.
        labels: one id or name, or a list / 1-d integer tensor of them (ids and names may mix).
        num_classes: the number of classes.
        class_names: the name of each id (index = id; None for a class without one), or None when the
            classes have no names.
        owner: what the classes belong to, for the errors ("this pipeline", "the classifier").
    """
    if isinstance(labels, Tensor):
        if labels.ndim > 1 or labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor of shape (N,), got {labels.dtype} of shape "
                             f"{tuple(labels.shape)}")
        items: list = labels.reshape(-1).tolist()
    elif isinstance(labels, (str, Integral)):
        items = [labels]
    elif isinstance(labels, Sequence):
        items = list(labels)
    else:
        raise TypeError(f"{name} must be a class id, a class name or a list of them, got {labels!r}")
    if not items:
        raise ValueError(f"{name} is empty; give at least one class id or name")
    index = {label: i for i, label in enumerate(class_names or ()) if label is not None}
    ids = []
    for item in items:
        if isinstance(item, str):
            if not index:
                raise ValueError(f"{name}: {item!r} is a class name, and the classes of {owner} have no names; "
                                 f"give class ids in [0, {num_classes})")
            if item not in index:
                raise ValueError(f"{name}: {item!r} is not a class of {owner}; valid names: {', '.join(index)}")
            ids.append(index[item])
        elif isinstance(item, Integral) and not isinstance(item, bool):
            if not 0 <= item < num_classes:
                raise ValueError(f"{name} must be in [0, {num_classes}), got {item}")
            ids.append(int(item))
        else:
            kinds = "class ids or names" if class_names else "class ids"
            raise ValueError(f"{name} must be {kinds} (int{' or str' if class_names else ''}), got {item!r}")
    return torch.tensor(ids, dtype=torch.long)


def repeat_rows(items: list, times: int) -> list:
    """[a, b] -> [a, a, b, b] for times=2: the images of one prompt stay together."""
    return [item for item in items for _ in range(times)]


def repeat_tensor(rows: Tensor, count: int, times: int) -> Tensor:
    """Rows for ``count`` prompts (1 row is shared by all) -> ``count * times`` rows, prompt by prompt."""
    if rows.shape[0] == 1:
        return rows.expand(count * times, *rows.shape[1:])
    return rows.repeat_interleave(times, dim=0)


# ------------------------------------------------------------------------------------------ the options
DEFAULT_GUIDANCE_SCALE = 4.0  # what guidance_scale=None means for the diffusion pipelines

# Why an option does not apply to a pipeline without its role, completing "<name>: <Pipeline> ..." (refused)
# or "<Pipeline> ignores <name>=<value>: ..." (warned about).
WHY_NOT = {
    "diffusion": "they configure diffusion samplers, and an autoregressive prior samples one token per grid cell",
    "steering": "cannot use classifier guidance, which steers the denoising steps of a diffusion sampler; use "
                "TextToImage or ClassToImage",
    "text": "has no text condition to guide against (a class's only negative is the null class)",
    "image": "takes no input image; strength is for ImageToImage and Inpaint",
    "tokens": "samples no tokens; token filtering is a TokensToImage setting",
}


def option(default: Any, help: str, *, cli: str | None = None, only: str | None = None, elsewhere: str = "refuse",
           integer: bool = False, minimum: float | None = None, maximum: float = math.inf,
           sampler: str | tuple[str, ...] | None = None, choices: tuple[str, ...] | None = None,
           why: str | None = None, report: bool = True) -> Any:
    """A :class:`GenerationOptions` field whose metadata drives the checks, the CLI flag and the docs.

    Args:
        default: the value a call that leaves the option out gets.
        help: one line for the docs and ``--help``.
        cli: the ``python -m pipelines.generate`` flag, or None for none.
        only: the pipeline role the option applies to ("diffusion", "text", "image", "steering", "tokens");
            None: every pipeline.
        elsewhere: what a pipeline without that role does with a value other than the default:
            "refuse" (ValueError) or "warn" (UserWarning, the value is ignored).
        integer, minimum, maximum: the value's bounds (None values are not checked).
        sampler: the sampler (or samplers) the option is passed to (``sample_latents(**sampler_options)``).
        choices: the valid values of a text option (checked; the app offers them), or None.
        why: the refusal's reason when it is not the role's :data:`WHY_NOT`.
        report: whether :meth:`GenerationOptions.report` lists it (False: how to run, not what to make).
    """
    return field(default=default, metadata=dict(help=help, cli=cli, only=only, elsewhere=elsewhere, integer=integer,
                                                 minimum=minimum, maximum=maximum, sampler=sampler, why=why,
                                                 report=report, choices=choices))


@dataclass(frozen=True)
class GenerationOptions:
    """The keyword arguments every pipeline call shares (diffusers' names); see :func:`check_options`."""

    num_inference_steps: int = option(20, "sampler steps (model evaluations, twice batched with guidance)",
                                      cli="--steps", only="diffusion", elsewhere="warn", integer=True, minimum=1)
    guidance_scale: float | None = option(None, "w in u + w (c - u): 1 = conditional only, 0 = unconditional "
                                          "only; None = the pipeline's default", cli="--guidance", minimum=0.0)
    guidance_rescale: float = option(0.0, "phi in [0, 1]: rescales the guided prediction's std towards the "
                                     "conditional one (Lin et al. 2023)", cli="--rescale", only="diffusion",
                                     elsewhere="warn", minimum=0.0, maximum=1.0)
    sampler: str = option("dpmpp_2m", "one of diffusion.samplers.SAMPLERS", cli="--sampler", only="diffusion",
                          elsewhere="warn")
    eta: float = option(0.0, "DDIM's eta: 0 deterministic, 1 DDPM-like", cli="--eta", only="diffusion",
                        elsewhere="warn", minimum=0.0, sampler="ddim")
    sigma_spacing: str = option("default", "the noise levels the sampler steps through: 'default' (the model's "
                                "timestep spacing), 'karras' (Karras et al. 2022, rho 7) or 'exponential' (even in "
                                "log sigma); diffusers' use_karras_sigmas / use_exponential_sigmas",
                                cli="--sigma-spacing", only="diffusion", elsewhere="warn",
                                sampler=SIGMA_SPACING_SAMPLERS, choices=SIGMA_SPACINGS)
    negative_prompt: str | list[str] | None = option(None, "replaces the null prompt \"\" in guidance's "
                                                     "unconditional branch; one, or one per prompt",
                                                     cli="--negative", only="text")
    height: int | None = option(None, "image height in pixels, checked by each pipeline (a multiple of its "
                                "size_multiple); None = the training resolution", cli="--height")
    width: int | None = option(None, "image width in pixels, as height", cli="--width")
    num_images_per_prompt: int = option(1, "images per prompt; results come prompt by prompt", integer=True,
                                        minimum=1)
    chunk_size: int = option(16, "images sampled and decoded at once: memory grows with it, not with the number "
                             "of images", cli="--chunk-size", integer=True, minimum=1)
    generator: torch.Generator | None = option(None, "the only source of randomness (a CPU generator draws the "
                                               "same noise on any device)", report=False)
    seed: int | None = option(None, "shorthand for generator=torch.Generator().manual_seed(seed)", integer=True,
                              minimum=0)
    latents: Tensor | None = option(None, "the start noise (images, D, h, w), as diffusers' latents=: used instead "
                                    "of a draw from the generator", only="diffusion", report=False)
    callback: Callback | None = option(None, "callback(step_index, latents, x0_hat) after each sampler step",
                                       only="diffusion", why="samples one token at a time and has no denoising "
                                       "steps to report; pass callback=None (progress=True shows a bar over the "
                                       "tokens)", report=False)
    progress: bool = option(True, "show a tqdm bar (on stderr)", report=False)
    output_type: str = option("pil", "'pil' (PIL images), 'pt' (tensor (B, 3, H, W) in [0, 1]) or 'latent'",
                              report=False)
    strength: float | None = option(None, "img2img/inpaint: the fraction of the trajectory re-run; None = "
                                    "ImageToImage 0.8, Inpaint 1.0", cli="--strength", only="image", minimum=0.0,
                                    maximum=1.0)
    classifier: NoisyLatentClassifier | str | Path | None = option(
        None, "classifier guidance: a NoisyLatentClassifier, or its directory or training run directory",
        cli="--classifier", only="steering")
    classifier_labels: Labels | None = option(None, "what the classifier steers towards: one class id or name, "
                                              "or one per prompt", only="steering")
    classifier_scale: float = option(1.0, "the classifier guidance scale; 0 = no steering", cli="--classifier-scale",
                                     only="steering", minimum=0.0)
    guidance_tokens: int | None = option(None, "guide only the first N tokens (0: all); None = the saved default",
                                         cli="--guidance-tokens", only="tokens", integer=True, minimum=0)
    temperature: float | None = option(None, "token sampling temperature; None = the saved default",
                                       cli="--temperature", only="tokens", minimum=0.0)
    top_k: int | None = option(None, "keep the k most likely codes (0: all); None = the saved default",
                               cli="--top-k", only="tokens", integer=True, minimum=0)
    top_p: float | None = option(None, "nucleus sampling mass in (0, 1]; None = the saved default", cli="--top-p",
                                 only="tokens")

    def make_generator(self) -> torch.Generator | None:
        """The call's only source of randomness: ``generator``, a CPU generator seeded with ``seed``, or
        None (torch's global RNG, a different result on every call)."""
        if self.seed is not None:
            return torch.Generator().manual_seed(self.seed)
        return self.generator

    def sampler_options(self) -> dict[str, Any]:
        """The options of the sampler in use (fields with ``sampler=`` metadata), for ``sample_latents``."""
        return {f.name: getattr(self, f.name) for f in fields(self) if self.sampler in option_samplers(f)}

    def report(self, facts: PipelineFacts) -> dict[str, Any]:
        """The settings that made a call's images, JSON-ready: the checked options the pipeline uses
        (classifier guidance only with a classifier), without how it ran (generator, progress, ...)."""
        report = {}
        for f in fields(self):
            role, value = f.metadata["only"], getattr(self, f.name)
            if f.metadata["report"] and (role is None or role in facts.roles) and (
                    role != "steering" or self.classifier is not None):
                report[f.name] = value if value is None or isinstance(value, (bool, int, float, str, list)) else (
                    str(value) if isinstance(value, Path) else type(value).__name__)
        return report

    def given(self) -> dict[str, Any]:
        """The options that differ from their defaults, in field order."""
        return {f.name: getattr(self, f.name) for f in fields(self) if not _is_default(f, getattr(self, f.name))}


def option_samplers(f: dataclasses.Field) -> tuple[str, ...]:
    """The samplers an option is passed to (none for an option that is not a sampler's)."""
    wanted = f.metadata["sampler"]
    return () if wanted is None else (wanted,) if isinstance(wanted, str) else tuple(wanted)


def _is_default(f: dataclasses.Field, value: Any) -> bool:
    return value is None if f.default is None else (value is f.default or value == f.default)


GenerationOptions.__doc__ = "\n".join(
    [GenerationOptions.__doc__ or "", "", "Attributes:"]
    + [f"    {f.name}: {f.metadata['help']} (default {f.default!r})" for f in fields(GenerationOptions)])
OPTION_NAMES = tuple(f.name for f in fields(GenerationOptions))


class PipelineFacts(NamedTuple):
    """What :func:`check_options` needs to know about a pipeline (plain data, no model).

    Attributes:
        name: the class name, which refusals and warnings start with.
        roles: what the pipeline does ({"diffusion", "text", "image", "steering", "tokens"}); an option with
            ``only=<role>`` applies where the role is present.
        default_guidance_scale: what ``guidance_scale=None`` means.
        default_strength: what ``strength=None`` means (None without an input image).
        num_train_timesteps: the most sampler steps (None: no denoising steps).
    """

    name: str
    roles: frozenset[str]
    default_guidance_scale: float
    default_strength: float | None = None
    num_train_timesteps: int | None = None


def options_from_call(owner: str, given: dict[str, Any]) -> GenerationOptions:
    """A call's keyword arguments as :class:`GenerationOptions`; an unknown name is a TypeError naming the
    closest known one."""
    for name in given:
        if name not in OPTION_NAMES:
            close = difflib.get_close_matches(name, OPTION_NAMES, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid ones: {', '.join(OPTION_NAMES)}"
            raise TypeError(f"{owner}() got an unexpected keyword argument {name!r}{hint}")
    return GenerationOptions(**given)


def check_options(options: GenerationOptions, facts: PipelineFacts | None = None) -> GenerationOptions:
    """Check every option (the one place that does), and resolve the pipeline's defaults.

    Without ``facts``, only what needs no pipeline: types, bounds, names, combinations. With them also
    whether each option applies (refused, or warned about and ignored), the step count against the
    training timesteps, and ``guidance_scale``/``strength`` resolved to the pipeline's defaults.
    """
    for f in fields(options):
        value, meta = getattr(options, f.name), f.metadata
        if value is None or (meta["minimum"] is None and not meta["integer"]):
            continue
        if meta["integer"]:
            check_int(f.name, value, int(meta["minimum"]))
        else:
            check_number(f.name, value, meta["minimum"], meta["maximum"])
    _check_values(options)
    if facts is None:
        return options
    _check_roles(options, facts)
    steps = options.num_inference_steps
    if facts.num_train_timesteps is not None and steps > facts.num_train_timesteps:
        raise ValueError(f"num_inference_steps must be <= {facts.num_train_timesteps} (the schedule's training "
                         f"timesteps), got {steps}")
    guidance = facts.default_guidance_scale if options.guidance_scale is None else float(options.guidance_scale)
    strength = facts.default_strength if options.strength is None else float(options.strength)
    return dataclasses.replace(options, guidance_scale=guidance, strength=strength)


def _check_values(options: GenerationOptions) -> None:
    """The checks that are more than bounds: names, callables, and options that need one another."""
    get_sampler(options.sampler)  # the one check of sampler names
    for f in fields(options):
        if f.metadata["choices"] and getattr(options, f.name) not in f.metadata["choices"]:
            raise ValueError(f"{f.name} must be one of {', '.join(map(repr, f.metadata['choices']))}, "
                             f"got {getattr(options, f.name)!r}")
    for name, value in options.given().items():
        wanted = option_samplers(fields(GenerationOptions)[OPTION_NAMES.index(name)])
        if wanted and options.sampler not in wanted:
            which = f"sampler {wanted[0]!r}" if len(wanted) == 1 else f"samplers {', '.join(map(repr, wanted))}"
            raise ValueError(f"{name}={value!r} is an option of {which}, and the sampler is {options.sampler!r}; "
                             f"pass sampler={wanted[0]!r} or leave {name} out")
    _check_randomness(options)
    if options.callback is not None and not callable(options.callback):
        raise TypeError(f"callback must be callable as callback(step_index, latents, x0_hat), got {options.callback!r}")
    if options.output_type not in OUTPUT_TYPES:
        raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, "
                         f"got {options.output_type!r}")
    if options.temperature is not None and options.temperature == 0:
        raise ValueError("temperature must be a finite number > 0, got 0 (use top_k=1 for greedy decoding)")
    if options.top_p is not None and not 0 < check_number("top_p", options.top_p, -math.inf) <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {options.top_p}")
    _check_classifier(options)


def _check_randomness(options: GenerationOptions) -> None:
    if options.generator is not None and options.seed is not None:
        raise ValueError("generator and seed were both given; give one (seed=n is "
                         "generator=torch.Generator().manual_seed(n))")
    if options.generator is not None and not isinstance(options.generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(options.generator).__name__}")


def _check_classifier(options: GenerationOptions) -> None:
    """The classifier guidance options that need no loaded classifier (the pipeline checks the labels)."""
    if options.classifier is None and (options.classifier_labels is not None or options.classifier_scale != 1.0):
        given = ("classifier_labels" if options.classifier_labels is not None
                 else f"classifier_scale={options.classifier_scale:g}")
        raise ValueError(f"{given} needs a classifier: pass classifier= (a NoisyLatentClassifier, or the directory "
                         f"of one or of its training run)")
    if options.classifier is not None and not isinstance(options.classifier, (NoisyLatentClassifier, str, Path)):
        raise TypeError(f"classifier must be a NoisyLatentClassifier or the path of its directory, "
                        f"got {type(options.classifier).__name__}")


def _check_roles(options: GenerationOptions, facts: PipelineFacts) -> None:
    """Refuse (or warn about and ignore) options given to a pipeline they do not apply to."""
    ignored = []
    for f in fields(options):
        role, value = f.metadata["only"], getattr(options, f.name)
        if role is None or role in facts.roles or _is_default(f, value):
            continue
        if f.metadata["elsewhere"] == "warn":
            ignored.append((f"{f.name}={value!r}", WHY_NOT[role]))
        else:
            raise ValueError(f"{f.name}: {facts.name} {f.metadata['why'] or WHY_NOT[role]}")
    if ignored:
        warnings.warn(f"{facts.name} ignores {', '.join(name for name, _ in ignored)}: {ignored[0][1]}",
                      UserWarning, stacklevel=5)


def check_size(name: str, value: object, multiple: int, why: str, default: int) -> int:
    """One image side in pixels (None: ``default``), a positive multiple of ``multiple`` (``why``: the reason)."""
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an integer number of pixels, got {value!r}")
    if value < 1:
        raise ValueError(f"{name}={value}: image sizes must be positive multiples of {multiple} ({why}); "
                         f"leave {name} out for the training resolution {default}")
    if value % multiple:
        lower = value - value % multiple
        valid = f"{lower} or {lower + multiple}" if lower else f"{multiple}"
        raise ValueError(f"{name}={value} is not a multiple of {multiple} ({why}); image sizes must be "
                         f"multiples of {multiple}, e.g. {valid}")
    return value


# ------------------------------------------------------------------------------------------ memory
@dataclass(frozen=True)
class ImageCost:
    """The estimated bytes one image of a call needs (each pipeline's ``image_cost``), for :func:`check_memory`.

    Attributes:
        working: while its chunk is made (sampler or token state, the networks' activations, decoded
            pixels); a chunk holds ``chunk_size`` of these at once, whatever the number of images.
        kept: until the call returns: the result, and per-image state drawn up front.
    """

    working: int
    kept: int


def available_memory(device: torch.device) -> int | None:
    """Bytes a call can still allocate on ``device`` (None: unknown, nothing is checked).

    CUDA: the driver's free memory. CPU: the kernel's MemAvailable (free memory plus page cache it can drop),
    lowered to what a cgroup limit leaves, since a container or a scheduler's job is killed at that limit.
    """
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
        free = int(meminfo["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None
    cgroup = Path("/sys/fs/cgroup")
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            free = min(free, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return free


def _size(count: float) -> str:
    """Bytes for people: 512 B, 1.5 KB, ..., 3.2 TB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1024 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError


def check_memory(run: GenerationOptions, cost: ImageCost, count: int, size: tuple[int, int], device: torch.device,
                 prompts: tuple[str, int]) -> None:
    """Refuse a call whose images cannot fit in memory, before anything is allocated (ValueError).

    The estimate is ``working * min(chunk_size, count) + kept * count`` (see :class:`ImageCost`): the
    chunks make memory flat in the number of images except for the result itself. The error names the
    argument to change: the size when one image alone does not fit, ``chunk_size`` when a chunk does not,
    else the number of images (``num_images_per_prompt``, or the prompts / labels, ``prompts`` = (name, count)).
    """
    free = available_memory(device)
    chunk = min(run.chunk_size, count)
    need = cost.working * chunk + cost.kept * count
    if free is None or need <= free:
        return
    height, width = size
    if cost.working + cost.kept > free:
        culprit = f"height={height}, width={width}"
        fix = "lower height and width (leave them out for the training resolution)"
    elif cost.working + cost.kept * count <= free:  # one image per chunk would fit
        fits = (free - cost.kept * count) // cost.working
        culprit, fix = f"chunk_size={run.chunk_size}", f"lower chunk_size to {fits} or less"
    else:
        fits = max((free - cost.working * chunk) // cost.kept, 1)
        name, given = prompts
        culprit = (f"num_images_per_prompt={run.num_images_per_prompt}" if run.num_images_per_prompt > 1
                   else f"{name} ({given} of them)")
        fix = f"make at most {fits} images per call (fewer prompts or num_images_per_prompt) and call again for more"
    images = "1 image needs" if count == 1 else f"{count} images need"
    raise ValueError(f"{culprit}: {images} about {_size(need)} at {height}x{width} px "
                     f"({_size(cost.working)} per image of a chunk of {chunk}, {_size(cost.kept)} per image kept for "
                     f"the result), and {_size(free)} is available on {device}; {fix}")

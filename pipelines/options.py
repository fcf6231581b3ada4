"""The call arguments every pipeline shares, checked in one place before any model runs.

Each check raises ValueError (a bad value) or TypeError (a wrong type) whose message starts with the
argument's name as the user wrote it, e.g. ``num_inference_steps must be >= 1, got 0``, so a mistake
costs no sampling time and needs no reading of tracebacks.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral

import torch
from torch import Tensor

from diffusion.samplers import SAMPLERS, Callback

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


def check_sampler(sampler: object) -> str:
    """A name of :data:`diffusion.samplers.SAMPLERS`."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is unknown; valid samplers: {', '.join(sorted(SAMPLERS))}")
    return str(sampler)


def as_prompts(prompt: str | Sequence[str], name: str = "prompt") -> list[str]:
    """One prompt or a list of them as a non-empty list of strings ("" is the unconditional prompt)."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, Sequence) or not all(isinstance(p, str) for p in prompts):
        raise TypeError(f"{name} must be a string or a list of strings, got {prompt!r}")
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


def label_ids(name: str, labels: Labels, num_classes: int, class_names: Sequence[str] | None = None,
              owner: str = "this pipeline") -> Tensor:
    """Class ids or names -> a non-empty (N,) int64 tensor of ids in [0, num_classes).

    Args:
        name: the argument's name, which every error starts with.
        labels: one id or name, or a list / 1-d integer tensor of them (ids and names may mix).
        num_classes: the number of classes.
        class_names: the name of each id (index = id), or None when the classes have no names.
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
    index = {label: i for i, label in enumerate(class_names or ())}
    ids = []
    for item in items:
        if isinstance(item, str):
            if not class_names:
                raise ValueError(f"{name}: {item!r} is a class name, and the classes of {owner} have no names; "
                                 f"give class ids in [0, {num_classes})")
            if item not in index:
                raise ValueError(f"{name}: {item!r} is not a class of {owner}; valid names: {', '.join(class_names)}")
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


@dataclass(frozen=True)
class RunOptions:
    """The shared keyword arguments of every pipeline call, validated on construction.

    Field names are the call's argument names, so every error names what the user typed. See
    :class:`pipelines.TextToImage.__call__` for what each one means.
    """

    num_inference_steps: int = 20
    guidance_scale: float | None = None
    guidance_rescale: float = 0.0
    sampler: str = "dpmpp_2m"
    height: int | None = None
    width: int | None = None
    num_images_per_prompt: int = 1
    generator: torch.Generator | None = None
    seed: int | None = None
    callback: Callback | None = None
    progress: bool = True
    output_type: str = "pil"

    def __post_init__(self) -> None:
        check_int("num_inference_steps", self.num_inference_steps, 1)
        if self.guidance_scale is not None:
            check_number("guidance_scale", self.guidance_scale, 0.0)
        check_number("guidance_rescale", self.guidance_rescale, 0.0, 1.0)
        check_sampler(self.sampler)
        for name in ("height", "width"):
            if getattr(self, name) is not None:
                check_int(name, getattr(self, name), 1)
        check_int("num_images_per_prompt", self.num_images_per_prompt, 1)
        self._check_randomness()
        if self.callback is not None and not callable(self.callback):
            raise TypeError(f"callback must be callable as callback(step_index, latents, x0_hat), "
                            f"got {self.callback!r}")
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {', '.join(map(repr, OUTPUT_TYPES))}, "
                             f"got {self.output_type!r}")

    def _check_randomness(self) -> None:
        if self.generator is not None and self.seed is not None:
            raise ValueError("generator and seed were both given; give one (seed=n is "
                             "generator=torch.Generator().manual_seed(n))")
        if self.generator is not None and not isinstance(self.generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(self.generator).__name__}")
        if self.seed is not None:
            check_int("seed", self.seed, 0)

    def make_generator(self) -> torch.Generator | None:
        """The call's only source of randomness: ``generator``, a CPU generator seeded with ``seed``, or
        None (torch's global RNG, a different result on every call)."""
        if self.seed is not None:
            return torch.Generator().manual_seed(self.seed)
        return self.generator

    def guidance(self, default: float) -> float:
        """``guidance_scale``, or the pipeline's ``default`` when it was left as None."""
        return default if self.guidance_scale is None else float(self.guidance_scale)

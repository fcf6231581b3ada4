"""Generate an image grid from a training run or pipeline directory.

    python -m pipelines.generate runs/emoji32_diffusion "dog face" "red apple" -n 4 --seed 0 -o grid.png
    python -m pipelines.generate runs/emoji32_diffusion "dog face" --init-image in.png --strength 0.6
    python -m pipelines.generate runs/emoji32_diffusion "dog face" --init-image in.png --mask mask.png
    python -m pipelines.generate runs/emoji32_maskgit "dog face" --init-image in.png --mask mask.png   # tokens
    python -m pipelines.generate runs/shapes32_diffusion "a small circle" --guidance 1 \
        --classifier runs/shapes32_classifier --classifier-label red --classifier-scale 3
    python -m pipelines.generate --from-png grid.png -o again.png     # the same grid again, bit for bit

The grid has one row per prompt and one column per image (``-n``). The output path is printed, then
one JSON line with every setting that produced it (the seed included: one is drawn when --seed is
left out, so any grid can be made again). A class-conditional pipeline takes class ids (or the class
names saved with it) as prompts. ``--classifier`` adds classifier guidance (text- and class-to-image)
towards ``--classifier-label``: given once it applies to every prompt, or repeat it once per prompt.
The generation flags (``--steps``, ``--guidance``, ``--sampler``, ...) come from the ``cli`` metadata of
:class:`pipelines.options.GenerationOptions` and are checked there, once; a flag left out is not
passed, so the pipeline's default applies. Bad arguments print one ``error:`` line and exit with status 2,
before any model is loaded where they can be seen from the command line (the ``-o`` path, ``--device``),
and so do failures while generating and writing (out of memory, disk full); the grid is written to a
temporary file beside ``-o`` and renamed, so a failed write leaves any earlier file there untouched.

A PNG grid carries every setting in its ``parameters`` text chunk (:mod:`pipelines.png_info`: the prompts,
the options, the layout, and the pipeline's directory and weights hash). ``--from-png IMAGE.png`` reads
it and makes the same image again (a grid of this command, a demo grid, or one image saved by the web
app), bit for bit on the same machine; ``--path`` points to the pipeline when it has moved, and a
pipeline whose files hash differently is refused.
"""
from __future__ import annotations

import argparse
import dataclasses
import errno
import io
import json
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NoReturn

import torch
from PIL import Image

from common.checkpoint import CheckpointError
from common.precision import CHOICES as PRECISIONS
from diffusion.samplers import SAMPLERS
from pipelines.base import Pipeline
from pipelines.image_to_image import ImageToImage, Inpaint
from pipelines.loading import load_pipeline
from pipelines.options import GenerationOptions, check_options, options_from_call
from pipelines.png_info import (
    Layout,
    Parameters,
    call,
    identify,
    png_bytes,
    read_parameters,
    recorded_options,
    regenerate,
    render,
)
from pipelines.text_to_image import ClassToImage

OPTION_FLAGS = {f.name: f.metadata["cli"] for f in dataclasses.fields(GenerationOptions) if f.metadata["cli"]}
FLAG_TYPES = {"int": int, "float": float}  # by the first type of a field's annotation; anything else is a string


class ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the usage itself is in --help)."""

    def error(self, message: str) -> NoReturn:
        fail(message)


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def fail_option(error: Exception) -> NoReturn:
    """An option's error as the pipelines word it, with the flag: ``--sampler 'plms' is unknown; ...``, or
    ``--steps: num_inference_steps must be >= 1, got 0`` where the flag is not ``--<option name>``."""
    message = str(error)
    for name, flag in {**OPTION_FLAGS, "num_images_per_prompt": "-n"}.items():
        if message.startswith(f"{name} "):
            fail(f"--{message}" if flag == f"--{name}" else f"{flag}: {message}")
        if message.startswith(f"{name}="):
            fail(f"{flag}: {message}")
    fail(message)


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per option with ``cli`` metadata; left out, it is not passed (the pipeline's default applies)."""
    for f in dataclasses.fields(GenerationOptions):
        if f.metadata["cli"] is None:
            continue
        kind = FLAG_TYPES.get(str(f.type).split("|")[0].strip(), str)
        extra = f" ({', '.join(sorted(SAMPLERS))})" if f.name == "sampler" else ""
        parser.add_argument(f.metadata["cli"], dest=f.name, type=kind, default=argparse.SUPPRESS,
                            help=f"{f.metadata['help']}{extra}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m pipelines.generate", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", help="training run directory (holding pipeline/) or pipeline directory")
    parser.add_argument("prompts", nargs="+", help="prompts, one grid row each (class ids for a class pipeline)")
    parser.add_argument("-n", "--num-images", type=int, default=4, help="images per prompt (grid columns)")
    parser.add_argument("-o", "--output", default="generated.png", help="output PNG path")
    parser.add_argument("--seed", type=int, default=None, help="random seed (default: drawn and reported)")
    add_option_flags(parser)
    parser.add_argument("--init-image", default=None, help="start from this image (image-to-image)")
    parser.add_argument("--mask", default=None, help="inpaint: white pixels of this mask are regenerated "
                        "(where its alpha varies: its opaque pixels)")
    parser.add_argument("--classifier-label", action="append", default=None, dest="classifier_labels",
                        help="class name (or id) of the classifier's attribute to steer towards, e.g. red; once for "
                             "all prompts, or once per prompt")
    parser.add_argument("--scale", type=int, default=1, help="upscale the grid by this factor (nearest)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS),
                        help="what the networks sample in (auto: bf16 only where the device runs it natively faster)")
    parser.add_argument("--lora", default=None, help="a LoRA adapter to sample with: its .safetensors file, its "
                        "folder, or the fine-tuning run that wrote lora/")
    parser.add_argument("--lora-scale", type=float, default=1.0, help="adapter strength (0: the base's images)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    check_arguments(args)
    return args


def check_arguments(args: argparse.Namespace) -> None:
    """Catch what argparse cannot, before any model is loaded: the CLI's own flags, then the options."""
    given = vars(args)
    if args.num_images < 1 or args.scale < 1:
        fail("--num-images and --scale must be >= 1")
    if ("strength" in given or args.mask) and not args.init_image:
        fail("--strength and --mask need --init-image")
    if (args.classifier_labels or "classifier_scale" in given) and "classifier" not in given:
        fail("--classifier-label and --classifier-scale need --classifier")
    if "classifier" in given and not args.classifier_labels:
        fail("--classifier needs --classifier-label (the class to steer towards, e.g. red)")
    if args.lora_scale != 1.0 and not args.lora:
        fail("--lora-scale needs --lora (the adapter to scale)")
    if "classifier" in given and args.init_image:
        fail("--classifier works with text- and class-to-image pipelines, not with --init-image")
    for name in ("path", "init_image", "mask", "classifier", "lora"):
        value = given.get(name)
        if value and not Path(value).exists():
            fail(f"{'--' + name.replace('_', '-') if name != 'path' else 'path'} {value} does not exist")
    check_output(args.output)
    check_device(args.device)
    try:
        check_options(options_from_call("pipelines.generate", call_options(args)))
    except (ValueError, TypeError) as error:
        fail_option(error)


def check_output(value: str) -> None:
    """``-o``: a file name in a format PIL writes, in a folder that exists or can be made, where we may write.

    Whether the folder takes a file is tried for real (an unnamed temporary file, gone when closed): it
    also catches read-only file systems and full quotas, which permission bits do not show (nor to root).
    """
    path = Path(value)
    if path.is_dir():
        fail(f"-o {value} is a folder; give a file name, e.g. -o {path / 'grid.png'}")
    if Image.registered_extensions().get(path.suffix.lower()) not in Image.SAVE:
        fail(f"-o {value}: {path.suffix or 'no extension'} is not an image format PIL writes; end the name with .png")
    folder = path.absolute().parent
    while not folder.exists():  # the folders that are missing are made when the grid is written
        folder = folder.parent
    if not folder.is_dir():
        fail(f"-o {value}: {folder} is a file, so no folder can be made there; choose another -o")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        fail(f"-o {value}: cannot write in {folder} ({error.strerror}); choose another -o")
    if path.exists() and not os.access(path, os.W_OK):
        fail(f"-o {value} exists and is read-only; choose another -o or make it writable")


def check_device(name: str) -> None:
    """``--device``: a device torch knows that this machine has."""
    try:
        device = torch.device(name)
    except RuntimeError:
        fail(f"--device {name!r} is not a device name; use cpu, or cuda (cuda:N for GPU N)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            fail(f"--device {name}: no CUDA GPU is visible here (torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= count:
            fail(f"--device {name}: this machine has {count} GPU(s), cuda:0 to cuda:{count - 1}")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        fail(f"--device {name}: MPS is not available here; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        fail(f"--device {name}: this command runs on cpu, cuda or mps")


def encode(image: Image.Image, parameters: Parameters, output: str) -> bytes:
    """The file's bytes: a PNG with the ``parameters`` chunk, or any other format PIL writes (no settings)."""
    kind = Image.registered_extensions()[Path(output).suffix.lower()]
    if kind == "PNG":
        return png_bytes(image, parameters)
    data = io.BytesIO()
    image.save(data, format=kind)
    return data.getvalue()


def write_file(data: bytes, output: str) -> Path:
    """Write beside ``-o`` and rename into place (atomic: a failed write leaves no partial file and any
    earlier one untouched). Disk full is an error with the space needed."""
    path = Path(output)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(partial, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            free = shutil.disk_usage(path.parent).free
            fail(f"-o {path}: the disk is full: the grid needs {len(data):,} bytes and {free:,} are free in "
                 f"{path.parent}; free some space or choose another -o (nothing was written)")
        fail(f"-o {path}: cannot write the grid ({error.strerror}); choose another -o (nothing was written)")
    return path


def call_options(args: argparse.Namespace) -> dict[str, Any]:
    """The pipeline call's keyword arguments: the option flags given, and the CLI's own settings."""
    options = {name: getattr(args, name) for name in OPTION_FLAGS if hasattr(args, name)}
    if args.classifier_labels:
        options["classifier_labels"] = [as_label(v) for v in args.classifier_labels]
    return dict(options, num_images_per_prompt=args.num_images, seed=args.seed, progress=not args.no_progress,
                output_type="pt")


def load(args: argparse.Namespace) -> Pipeline:
    """The pipeline the arguments ask for: load_pipeline's class, or img2img / inpainting."""
    pipe = load_pipeline(args.path)
    if args.init_image:
        if isinstance(pipe, ClassToImage):
            fail(f"--init-image needs a text-to-image or token pipeline, and {args.path} holds a "
                 f"{type(pipe).__name__} pipeline")
        pipe = (Inpaint if args.mask else ImageToImage).from_pipe(pipe)
    if args.lora:
        pipe.load_lora(args.lora, scale=args.lora_scale)
    return pipe.to(args.device, precision=args.precision)


def recorded_prompts(pipe: Pipeline, args: argparse.Namespace) -> list[Any]:
    """The call's prompts, or the class labels of a class pipeline (ids and names, checked)."""
    if isinstance(pipe, ClassToImage):
        labels = [as_label(p) for p in args.prompts]
        if pipe.class_names is None and not all(isinstance(label, int) for label in labels):
            fail(f"{args.path} holds a class-conditional pipeline without class names: prompts must be class ids "
                 f"in [0, {pipe.num_classes}), got {args.prompts}")
        return labels
    return list(args.prompts)


def absolute(value: str | None) -> str | None:
    """A path for the parameters chunk, absolute so that ``--from-png`` finds it from any folder."""
    return None if value is None else str(Path(value).resolve())


def parameters_of(pipe: Pipeline, args: argparse.Namespace, options: dict[str, Any]) -> Parameters:
    """Everything that makes the grid: what ``--from-png`` reads back from the PNG (size: filled in after)."""
    if isinstance(options.get("classifier"), str):
        options["classifier"] = absolute(options["classifier"])
    return Parameters(identify(args.path), type(pipe).__name__, recorded_prompts(pipe, args), options, (0, 0),
                      Layout(columns=args.num_images, scale=args.scale), absolute(args.init_image),
                      absolute(args.mask), args.precision, absolute(args.lora), args.lora_scale)


def as_label(text: str) -> int | str:
    """A command-line class label: an integer is a class id, anything else a class name."""
    try:
        return int(text)
    except ValueError:
        return text


def main(argv: list[str] | None = None) -> dict[str, Any]:
    argv = sys.argv[1:] if argv is None else list(argv)
    if any(arg == "--from-png" or arg.startswith("--from-png=") for arg in argv):
        return main_from_png(argv)
    args = parse_args(argv)
    if args.seed is None:
        args.seed = random.randrange(2**31)
    start = time.perf_counter()
    try:
        pipe = load(args)
        given = call_options(args)
        settings = pipe.options(given).report(pipe.facts)  # checked once; warns about the options it ignores
        parameters = parameters_of(pipe, args, recorded_options(given, settings))
        images = call(pipe, parameters, progress=not args.no_progress)
    except (ValueError, TypeError, CheckpointError, OSError) as error:
        fail_option(error)
    except torch.OutOfMemoryError:
        fail(f"out of memory on {args.device} while generating; lower --chunk-size (images made at once), or "
             f"--height/--width")
    parameters = dataclasses.replace(parameters, size=(images[0].height, images[0].width))
    path = write_file(encode(render(images, parameters), parameters, args.output), args.output)
    report = {"output": str(path), "path": str(args.path), "pipeline": type(pipe).__name__, "prompts": args.prompts,
              **settings, "init_image": args.init_image, "mask": args.mask, "precision": args.precision,
              "lora": args.lora, "lora_scale": args.lora_scale if args.lora else None,
              "seconds": round(time.perf_counter() - start, 2)}
    print(path)
    print(json.dumps(report))
    return report


def main_from_png(argv: list[str]) -> dict[str, Any]:
    """``--from-png IMAGE.png``: make a PNG's image again from its ``parameters`` chunk."""
    parser = ArgumentParser(prog="python -m pipelines.generate --from-png",
                            description="Make a PNG written by latentgen again, from the settings inside it.")
    parser.add_argument("--from-png", required=True, metavar="IMAGE.png", help="a PNG written by latentgen")
    parser.add_argument("--path", default=None, help="the pipeline to use when it has moved (its files must hash "
                        "as recorded)")
    parser.add_argument("-o", "--output", default=None, help="output PNG path (default: IMAGE.again.png)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    source = Path(args.from_png)
    if not source.is_file():
        fail(f"--from-png {source} does not exist")
    if args.path is not None and not Path(args.path).exists():
        fail(f"--path {args.path} does not exist")
    output = args.output or str(source.with_name(f"{source.stem}.again.png"))
    if Path(output).suffix.lower() != ".png":
        fail(f"-o {output}: --from-png writes a PNG; end the name with .png")
    check_output(output)
    check_device(args.device)
    try:
        image, parameters = regenerate(read_parameters(source), args.path, args.device, not args.no_progress)
    except (ValueError, TypeError, CheckpointError, OSError) as error:
        fail(str(error))
    except torch.OutOfMemoryError:
        fail(f"out of memory on {args.device} while generating; try another --device")
    path = write_file(png_bytes(image, parameters), output)
    report = {"output": str(path), "from_png": str(source), "path": parameters.pipeline.path,
              "pipeline": parameters.task, "prompts": parameters.prompts, **parameters.options}
    print(path)
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])

"""A local web app over the pipelines: ``python -m pipelines.app PIPELINE_OR_RUN_DIR [...]``.

    pip install -e '.[app]'                                   # gradio, an optional extra
    python -m pipelines.app runs/emoji32_diffusion            # then open http://127.0.0.1:7860
    python -m pipelines.app runs/emoji32_diffusion runs/emoji32_maskgit --port 7861   # a dropdown of both

Each pipeline is loaded once and offers a tab per task it can do: text to image (or class to image for a
class-conditional U-Net, token generation for a token prior), image to image, and inpainting on a mask
drawn over the image. The option controls come from :class:`pipelines.options.GenerationOptions`
(:func:`pipelines.app_calls.controls`): steps, guidance, rescale, sampler, strength, the token filters, and
any option added there later. A progress bar follows the sampler steps; the gallery shows the images, and
each one is also a PNG with its settings inside (:mod:`pipelines.png_info`) to download;
``python -m pipelines.generate --from-png`` makes it again. Invalid settings show the pipeline's own
error message in the page.

The server listens on 127.0.0.1 unless ``--host`` says otherwise. Requests queue: each pipeline
generates one request at a time (gradio's queue with a concurrency limit of 1 per pipeline), so several
browser tabs all get their images and memory stays flat.
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import math
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch

try:
    import gradio as gr
except ImportError as missing:  # an optional extra: say how to get it
    raise ImportError("the web app needs gradio, an optional extra: pip install -e '.[app]'") from missing

from common.checkpoint import CheckpointError
from common.precision import CHOICES as PRECISIONS
from pipelines.app_calls import (
    MAX_IMAGES,
    MAX_SEED,
    Control,
    Entry,
    Request,
    Tab,
    call_options,
    editor_inputs,
    generate,
    load_entry,
)
from pipelines.png_info import Parameters

ERRORS = (ValueError, TypeError, CheckpointError)  # the pipelines' refusals: shown in the page
TITLE = "latentgen"


def control_component(control: Control, prefix: str) -> gr.components.Component:
    """The input component of one option control (element id ``<prefix>-<option name>``)."""
    common = dict(label=control.label, info=control.help, elem_id=f"{prefix}-{control.name}")
    if control.kind == "bool":
        return gr.Checkbox(value=bool(control.default), **common)
    if control.choices:
        return gr.Dropdown(list(control.choices), value=control.default, **common)
    if control.kind == "str":
        return gr.Textbox(value=control.default or "", **common)
    if control.kind == "float" and control.minimum is not None and math.isfinite(control.maximum):
        return gr.Slider(control.minimum, control.maximum, value=control.default, step=0.01, **common)
    # No bounds on the box: the browser would refuse a value with its own message, and the pipeline's
    # message (which names the option and the fix) is the one to show.
    return gr.Number(value=control.default, precision=0 if control.kind == "int" else None, **common)


def as_int(value: Any) -> int | None:
    """A number box's value as an int (None: empty)."""
    return None if value is None else int(value)


def settings_text(parameters: Parameters) -> str:
    """The parameters chunk, indented for reading."""
    return json.dumps(json.loads(parameters.to_json()), indent=1)


def handler(entry: Entry, tab: Tab, layout: list[str], folder: Path) -> Callable[..., tuple]:
    """The click handler of a tab: the values of its ``layout`` components, then of its option controls."""
    tab_controls = tab.controls

    # track_tqdm: a token prior has no sampler callback; its tqdm bar over the tokens feeds the page's bar
    def run(*values: Any, progress: gr.Progress = gr.Progress(track_tqdm=True)) -> tuple:  # noqa: B008
        placed, option_values = dict(zip(layout, values[:len(layout)])), list(values[len(layout):])
        image, mask = (editor_inputs(placed.get("editor")) if tab.input == "mask"
                       else (placed.get("image"), None))
        request = Request(
            prompt=str(placed["prompt"] or ""), negative_prompt=placed.get("negative") or "",
            seed=as_int(placed["seed"]), randomize=bool(placed["randomize"]), images=as_int(placed["images"]) or 1,
            height=as_int(placed.get("height")), width=as_int(placed.get("width")),
            options=call_options(tab_controls, option_values), image=image, mask=mask)
        try:
            result = generate(entry, tab, request, folder,
                              lambda done, total: progress((done, total), desc="sampling", unit="steps"))
        except ERRORS as error:
            raise gr.Error(str(error), print_exception=False) from None
        except torch.OutOfMemoryError:
            raise gr.Error("out of memory while generating: lower images per prompt, or height and width",
                           print_exception=False) from None
        captions = [(str(path), f"{request.prompt} · seed {result.seed} · {i}") for i, path in enumerate(result.files)]
        return captions, [str(path) for path in result.files], settings_text(result.parameters), result.seed

    return run


def build_tab(prefix: str, entry: Entry, tab: Tab, folder: Path) -> None:
    """One tab's inputs, outputs and its generate button (element ids start with ``prefix``)."""
    placed: dict[str, gr.components.Component] = {}
    with gr.Row():
        with gr.Column():
            if tab.input == "image":
                placed["image"] = gr.Image(type="pil", label="input image", elem_id=f"{prefix}-image")
            elif tab.input == "mask":
                placed["editor"] = gr.ImageEditor(
                    type="pil", label="image: paint the region to regenerate", elem_id=f"{prefix}-editor",
                    brush=gr.Brush(colors=["#ffffff"], color_mode="fixed"), layers=False)
            if tab.classes is not None:
                placed["prompt"] = gr.Dropdown(tab.classes, value=tab.classes[0], label="class",
                                               elem_id=f"{prefix}-prompt")
            else:
                placed["prompt"] = gr.Textbox(label="prompt", lines=2, elem_id=f"{prefix}-prompt")
            if "text" in tab.pipe.facts.roles:
                placed["negative"] = gr.Textbox(label="negative prompt", elem_id=f"{prefix}-negative")
            with gr.Row():
                placed["seed"] = gr.Number(0, label="seed", precision=0, info=f"0 to {MAX_SEED}",
                                           elem_id=f"{prefix}-seed")
                placed["randomize"] = gr.Checkbox(False, label="randomize seed")
            placed["images"] = gr.Slider(1, MAX_IMAGES, value=1, step=1, label="images per prompt")
            if tab.sized:
                step, default = tab.pipe.size_multiple, tab.pipe.model.autoencoder.config.resolution
                for name in ("width", "height"):
                    placed[name] = gr.Slider(step, max(4 * default, step), value=default, step=step, label=name,
                                             info=f"pixels, a multiple of {step}")
            with gr.Accordion("settings", open=True):
                options = [control_component(control, prefix) for control in tab.controls]
            button = gr.Button("Generate", variant="primary", elem_id=f"{prefix}-generate")
        with gr.Column():
            gallery = gr.Gallery(label="images", format="png", columns=2, elem_id=f"{prefix}-gallery",
                                 buttons=["download", "fullscreen"])
            files = gr.File(label="PNG files, settings inside", file_count="multiple", elem_id=f"{prefix}-files")
            settings = gr.Code(label="settings (the PNGs' parameters chunk)", language="json",
                               elem_id=f"{prefix}-settings")
    button.click(handler(entry, tab, list(placed), folder), inputs=[*placed.values(), *options],
                 outputs=[gallery, files, settings, placed["seed"]], concurrency_id=entry.name, concurrency_limit=1,
                 api_name=prefix.replace("-", "_"))


def build_app(entries: list[Entry], folder: str | Path) -> gr.Blocks:
    """The app over loaded pipelines (a dropdown chooses among several); images go to ``folder``."""
    folder = Path(folder)
    with gr.Blocks(title=TITLE, analytics_enabled=False) as app:
        gr.Markdown(f"## {TITLE}\nEach image is a PNG with its settings inside: "
                    "`python -m pipelines.generate --from-png IMAGE.png` makes it again.")
        chooser = gr.Dropdown([entry.name for entry in entries], value=entries[0].name, label="pipeline",
                              visible=len(entries) > 1, elem_id="pipeline")
        groups = []
        for i, entry in enumerate(entries):
            with gr.Column(visible=i == 0) as group, gr.Tabs():
                for j, tab in enumerate(entry.tabs):
                    with gr.Tab(tab.title, id=f"p{i}-t{j}"):
                        build_tab(f"p{i}-t{j}", entry, tab, folder)
            groups.append(group)
        chooser.change(lambda name: [gr.Column(visible=entry.name == name) for entry in entries], chooser, groups,
                       queue=False)
    app.queue(default_concurrency_limit=1)  # every pipeline's tabs also share one concurrency_id
    return app


def unique_names(entries: list[Entry]) -> list[Entry]:
    """Entries whose names (the dropdown's choices) differ: a repeated name gets " (2)", " (3)", ..."""
    seen: dict[str, int] = {}
    for entry in entries:
        seen[entry.name] = seen.get(entry.name, 0) + 1
        if seen[entry.name] > 1:
            entry.name = f"{entry.name} ({seen[entry.name]})"
    return entries


def fail(message: str) -> NoReturn:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipelines.app", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="PIPELINE_OR_RUN_DIR", help="pipelines to offer (loaded once)")
    parser.add_argument("--port", type=int, default=7860, help="the port to listen on")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on (default: this machine "
                        "only; 0.0.0.0 lets other machines in)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", default="auto", choices=("auto", *PRECISIONS))
    parser.add_argument("--outputs", default=None, help="folder of the PNGs made (default: a new temporary folder)")
    args = parser.parse_args(argv)
    for path in args.paths:
        if not Path(path).exists():
            fail(f"{path} does not exist; give a training run directory or a pipeline directory")
    if not 1 <= args.port <= 65535:
        fail(f"--port {args.port} is not a port number (1 to 65535)")
    return args


def is_local(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        entries = unique_names([load_entry(path, args.device, args.precision) for path in args.paths])
    except (CheckpointError, ValueError, OSError) as error:
        fail(str(error))
    folder = Path(args.outputs or tempfile.mkdtemp(prefix="latentgen-app-")).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if not is_local(args.host):
        print(f"warning: listening on {args.host}: anyone who can reach this machine can generate with it",
              file=sys.stderr)
    print(f"images are written to {folder}")
    try:
        build_app(entries, folder).launch(server_name=args.host, server_port=args.port, allowed_paths=[str(folder)],
                                          ssr_mode=False)
    except OSError as error:
        fail(f"cannot listen on {args.host}:{args.port} ({error}); choose another --port")


if __name__ == "__main__":
    main()

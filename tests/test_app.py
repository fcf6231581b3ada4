"""The web app without a browser: controls derived from GenerationOptions, the handlers called directly,
the pipelines' messages as page errors, inpainting from a drawn mask, several pipelines, concurrent requests."""
from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import generate
from pipelines.options import GenerationOptions, option
from pipelines.png_info import read_parameters
from tiny import build_pipelines

gr = pytest.importorskip("gradio", reason="gradio is a dev extra: pip install -e '.[dev]'")
app = pytest.importorskip("pipelines.app")
calls = pytest.importorskip("pipelines.app_calls")
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def entries(tmp_path_factory) -> dict:
    dirs = build_pipelines(tmp_path_factory.mktemp("app"))
    return {name: calls.load_entry(dirs[name]) for name in ("text", "class", "prior")}


def layout_of(tab) -> list[str]:
    """The names of a tab's laid-out inputs, in build_tab's order."""
    names = ["editor"] if tab.input == "mask" else ["image"] if tab.input == "image" else []
    names += ["prompt", "negative"] if "text" in tab.pipe.facts.roles else ["prompt"]
    return names + ["seed", "randomize", "images"] + (["width", "height"] if tab.sized else [])


def values(tab, prompt="a red circle", seed=3, images=1, placed=None, **changes) -> list:
    """A tab's handler arguments: its layout's values, then each option control's default or change."""
    given = dict(prompt=prompt, negative="", seed=seed, randomize=False, images=images, width=16, height=16)
    given |= placed or {}
    return [given.get(name) for name in layout_of(tab)] + [changes.get(c.name, c.default) for c in tab.controls]


def test_each_tab_gets_the_options_that_apply_to_its_pipeline(entries):
    names = {(e.name, tab.title): [c.name for c in tab.controls] for e in entries.values() for tab in e.tabs}
    text = names["text_run", "Text to image"]
    assert {"num_inference_steps", "guidance_scale", "guidance_rescale", "sampler", "eta", "chunk_size"} <= set(text)
    assert "strength" not in text and "temperature" not in text and "classifier_scale" not in text
    assert "strength" in names["text_run", "Image to image"] and "strength" in names["text_run", "Inpainting"]
    tokens = names["prior_run", "Token generation"]
    assert {"guidance_scale", "temperature", "top_k", "top_p"} <= set(tokens) and "num_inference_steps" not in tokens
    assert entries["class"].tabs[0].classes == ["circle", "square", "triangle"]
    steps = next(c for c in entries["text"].tabs[0].controls if c.name == "num_inference_steps")
    assert (steps.kind, steps.default, steps.maximum) == ("int", 20, 100)  # bounded by the schedule's 100 steps
    guidance = next(c for c in entries["prior"].tabs[0].controls if c.name == "guidance_scale")
    assert guidance.default == 2.0  # the prior's saved guidance, not None


def test_an_option_added_to_generation_options_appears_in_the_app(entries, monkeypatch):
    extended = dataclasses.make_dataclass("Extended", [("knob", float, option(0.5, "a new setting", only="diffusion",
                                                                              minimum=0.0, maximum=1.0))],
                                          bases=(GenerationOptions,), frozen=True)
    monkeypatch.setattr(calls, "GenerationOptions", extended)
    knob = next(c for c in entries["text"].tabs[0].controls if c.name == "knob")
    assert (knob.kind, knob.default, knob.minimum, knob.maximum, knob.help) == ("float", 0.5, 0.0, 1.0, "a new setting")
    assert isinstance(app.control_component(knob, "x"), gr.Slider)
    assert "knob" not in [c.name for c in entries["prior"].tabs[0].controls]


def test_control_values_become_call_options_only_where_changed(entries):
    controls = entries["text"].tabs[0].controls
    given = {c.name: c.default for c in controls} | {"num_inference_steps": 5.0, "sampler": "ddim",
                                                      "guidance_scale": None}
    options = calls.call_options(controls, [given[c.name] for c in controls])
    assert options == {"num_inference_steps": 5, "sampler": "ddim"}
    assert isinstance(options["num_inference_steps"], int)


def test_the_handler_makes_the_python_apis_images_and_pngs_with_settings(entries, tmp_path):
    from pipelines import TextToImage

    entry = entries["text"]
    tab = entry.tabs[0]
    gallery, files, settings, seed = app.handler(entry, tab, layout_of(tab), tmp_path)(
        *values(tab, images=2, num_inference_steps=4))
    assert seed == 3 and len(gallery) == 2 and len(files) == 2 and '"num_inference_steps": 4' in settings
    api = TextToImage.from_pretrained(entry.identity.path)("a red circle", num_images_per_prompt=2, seed=3,
                                                            num_inference_steps=4).images
    for path, expected in zip(files, api):
        assert np.array_equal(np.asarray(Image.open(path)), np.asarray(expected))
    assert read_parameters(files[1]).layout.index == 1
    out = Path(files[1]).with_name("again.png")
    generate.main(["--from-png", files[1], "-o", str(out), "--no-progress", "--device", "cpu"])
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(files[1])))
    randomized = values(tab, placed=dict(randomize=True), num_inference_steps=2)
    _, files, _, drawn = app.handler(entry, tab, layout_of(tab), tmp_path)(*randomized)  # a new seed, shown in the page
    assert 0 <= drawn < 2**31 and read_parameters(files[0]).options["seed"] == drawn


@pytest.mark.parametrize("changes, message", [
    (dict(num_inference_steps=0), "num_inference_steps must be >= 1, got 0"),
    (dict(sampler="plms"), "sampler 'plms' is unknown"),
    (dict(guidance_scale=-1.0), "guidance_scale must be a finite number >= 0, got -1.0"),
    (dict(num_inference_steps=2.5), "num_inference_steps must be an integer, got 2.5"),
])
def test_invalid_settings_are_the_pipelines_message_as_a_page_error(entries, tmp_path, changes, message):
    entry = entries["text"]
    with pytest.raises(gr.Error) as error:
        app.handler(entry, entry.tabs[0], layout_of(entry.tabs[0]), tmp_path)(*values(entry.tabs[0], **changes))
    assert message in str(error.value)


def test_size_and_seed_refusals(entries, tmp_path):
    entry = entries["text"]
    tab = entry.tabs[0]
    with pytest.raises(gr.Error, match="width=18 is not a multiple of 4"):
        app.handler(entry, tab, layout_of(tab), tmp_path)(*values(tab, placed=dict(width=18)))
    with pytest.raises(gr.Error, match="seed must be in"):
        app.handler(entry, tab, layout_of(tab), tmp_path)(*values(tab, seed=-1))


@pytest.mark.parametrize("name, task", [("text", "Inpaint"), ("prior", "TokenInpaint")])
def test_inpainting_takes_the_mask_drawn_on_the_image(entries, tmp_path, name, task):
    entry = entries[name]
    tab = next(t for t in entry.tabs if t.input == "mask")
    background = Image.new("RGBA", (16, 16), (200, 30, 30, 255))
    layer = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    layer.paste((255, 255, 255, 255), (0, 0, 8, 16))
    editor = {"background": background, "layers": [layer], "composite": background}
    run = app.handler(entry, tab, layout_of(tab), tmp_path)
    _, files, _, _ = run(*values(tab, placed=dict(editor=editor), num_inference_steps=4))
    parameters = read_parameters(files[0])
    mask = np.asarray(Image.open(parameters.mask))
    assert parameters.task == task and mask[:, :8].min() == 255 and mask[:, 8:].max() == 0
    out = Path(files[0]).with_name("again.png")
    generate.main(["--from-png", files[0], "-o", str(out), "--no-progress", "--device", "cpu"])
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(files[0])))
    with pytest.raises(gr.Error, match="mask: draw on the image"):
        run(*values(tab, placed=dict(editor={"background": background, "layers": []})))


def test_class_and_token_tabs(entries, tmp_path):
    class_entry, prior = entries["class"], entries["prior"]
    tab = class_entry.tabs[0]
    _, files, _, _ = app.handler(class_entry, tab, layout_of(tab), tmp_path)(
        *values(tab, prompt="square", num_inference_steps=2))
    assert read_parameters(files[0]).prompts == ["square"]
    tab = prior.tabs[0]
    _, files, _, _ = app.handler(prior, tab, layout_of(tab), tmp_path)(*values(tab, prompt="a dog", top_k=4))
    parameters = read_parameters(files[0])
    assert parameters.task == "TokensToImage" and parameters.options["top_k"] == 4


def test_several_pipelines_in_one_app_behind_a_dropdown(entries, tmp_path):
    blocks = app.build_app(list(entries.values()), tmp_path)
    config = blocks.get_config_file()
    dropdown = next(c for c in config["components"] if c["props"].get("elem_id") == "pipeline")
    assert [choice[0] for choice in dropdown["props"]["choices"]] == ["text_run", "class_run", "prior_run"]
    ids = {c["props"].get("elem_id") for c in config["components"]}
    assert {"p0-t0-generate", "p0-t2-editor", "p1-t0-prompt", "p2-t0-top_k"} <= ids


def test_four_requests_at_once_all_get_their_images(entries, tmp_path):
    entry = entries["text"]
    tab = entry.tabs[0]
    results, errors = {}, []

    def request(seed: int) -> None:
        try:
            results[seed] = calls.generate(entry, tab, calls.Request("a dog", seed=seed, options={
                "num_inference_steps": 3}), tmp_path)
        except Exception as error:  # noqa: BLE001 (the test reports any failure)
            errors.append(error)

    threads = [threading.Thread(target=request, args=(seed,)) for seed in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and sorted(results) == [0, 1, 2, 3]
    alone = calls.generate(entry, tab, calls.Request("a dog", seed=2, options={"num_inference_steps": 3}), tmp_path)
    assert np.array_equal(np.asarray(alone.images[0]), np.asarray(results[2].images[0]))


def test_the_command_line_checks_its_arguments(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        app.main([str(tmp_path / "nowhere")])
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    assert app.is_local("127.0.0.1") and app.is_local("localhost") and not app.is_local("0.0.0.0")


def test_progress_counts_every_sampler_step_of_the_request(entries, tmp_path):
    entry = entries["text"]
    seen = []
    calls.generate(entry, entry.tabs[1], calls.Request("a dog", seed=0, images=3, options={
        "num_inference_steps": 10, "chunk_size": 2}, image=Image.new("RGB", (16, 16), "red")), tmp_path,
        lambda done, total: seen.append((done, total)))
    assert seen == [(i, 16) for i in range(1, 17)]  # strength 0.8 of 10 steps, in 2 chunks of images

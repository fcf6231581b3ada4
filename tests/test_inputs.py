"""Images and masks converted as users mean them (pipelines/inputs.py): alpha masks, 16-bit and float
modes, palettes, NumPy arrays and integer tensors, through ImageToImage / Inpaint and ``mask_batch``.
Refusals and warnings are catalogued in test_bad_inputs_conversion.py."""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines import ImageToImage, Inpaint
from pipelines.inputs import image_batch, mask_batch

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"num_inference_steps": 3, "progress": False, "seed": 0, "guidance_scale": 2.0}

REGION = np.zeros((16, 16), dtype=bool)
REGION[:, 9] = True  # one pixel column: regenerates latent column 4 of the f=2 autoencoder, and only it


def _rgba(colour: tuple[int, int, int], outside: tuple[int, int, int, int] = (0, 0, 0, 0)) -> Image.Image:
    """Strokes of ``colour``, fully opaque, over ``outside`` elsewhere: a layer painted in an editor."""
    pixels = np.empty((16, 16, 4), dtype=np.uint8)
    pixels[:] = outside
    pixels[REGION] = (*colour, 255)
    return Image.fromarray(pixels, "RGBA")


def _palette(transparent: bool) -> Image.Image:
    image = Image.fromarray(REGION.astype(np.uint8), "P")
    if transparent:  # index 0 transparent black, index 1 opaque black: the region is only in the alpha
        image.putpalette([0, 0, 0] * 2)
        image.info["transparency"] = 0
    else:
        image.putpalette([0, 0, 0, 255, 255, 255])
    return image


def _wide(mode: str, inside: float, outside: float) -> Image.Image:
    dtype = {"I;16": np.uint16, "I": np.int32, "F": np.float32}[mode]
    image = Image.fromarray(np.where(REGION, inside, outside).astype(dtype))
    return image if image.mode == mode else image.convert(mode)


MASKS = {  # name -> a mask that marks REGION, as a user would hand it over
    "l_white_region": lambda: Image.fromarray(REGION.astype(np.uint8) * 255, "L"),
    "rgba_black_strokes_on_transparent": lambda: _rgba((0, 0, 0)),
    "rgba_red_strokes_on_transparent": lambda: _rgba((255, 0, 0)),
    "rgba_white_strokes_on_transparent_white": lambda: _rgba((255, 255, 255), (255, 255, 255, 0)),
    "rgba_opaque_white_on_black": lambda: _rgba((255, 255, 255), (0, 0, 0, 255)),
    "la_alpha": lambda: Image.fromarray(np.stack([np.zeros((16, 16), np.uint8), REGION * np.uint8(255)], -1), "LA"),
    "palette_with_transparency": lambda: _palette(transparent=True),
    "palette_black_white": lambda: _palette(transparent=False),
    "sixteen_bit_0_65535": lambda: _wide("I;16", 65535, 0),
    "sixteen_bit_dark_background": lambda: _wide("I;16", 65535, 4096),
    "mode_i_sixteen_bit": lambda: _wide("I", 60000, 1000),
    "float_mode_0_1": lambda: _wide("F", 1.0, 0.0),
    "float_mode_0_255": lambda: _wide("F", 255.0, 10.0),
    "numpy_uint8_0_255": lambda: REGION.astype(np.uint8) * 255,
    "numpy_uint8_0_1": lambda: REGION.astype(np.uint8),
    "numpy_uint16_0_65535": lambda: REGION.astype(np.uint16) * 65535,
    "numpy_bool_channel_last": lambda: REGION[..., None],
    "numpy_float_0_1": lambda: REGION.astype(np.float32),
    "tensor_float_0_1": lambda: torch.from_numpy(REGION.astype(np.float32))[None],
    "tensor_uint8_0_255": lambda: torch.from_numpy(REGION.astype(np.uint8) * 255),
    "tensor_int64_0_1": lambda: torch.from_numpy(REGION.astype(np.int64))[None, None],
    "tensor_bool": lambda: torch.from_numpy(REGION),
}


@pytest.mark.parametrize("case", MASKS)
def test_every_kind_of_mask_marks_the_region(case):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mask that marks its region draws no warning
        mask = mask_batch(MASKS[case](), 1, (16, 16), None, None)
    assert mask.shape == (1, 1, 16, 16) and mask.dtype == torch.float32
    assert torch.equal(mask[0, 0].bool(), torch.from_numpy(REGION))


def test_a_list_of_masks_of_mixed_kinds_is_one_per_prompt():
    masks = mask_batch([_rgba((0, 0, 0)), REGION.astype(np.uint8) * 255], 2, (16, 16), 8, 8)
    assert masks.shape == (2, 1, 8, 8) and torch.equal(masks[0], masks[1]) and masks.sum() == 2 * 8


def _colours() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)


IMAGES = {  # name -> (the image as given, the RGB uint8 pixels it means)
    "pil_rgb": (lambda: Image.fromarray(_colours()), _colours),
    "numpy_uint8_hwc": (_colours, _colours),
    "numpy_float_hwc": (lambda: _colours() / np.float32(255), _colours),
    "numpy_uint16_hwc": (lambda: _colours().astype(np.uint16) * 257, _colours),
    "tensor_uint8_chw": (lambda: torch.from_numpy(_colours()).permute(2, 0, 1), _colours),
    "list_of_one_array": (lambda: [_colours()], _colours),
    "rgba_transparent_onto_white": (lambda: Image.new("RGBA", (16, 16), (0, 0, 0, 0)),
                                    lambda: np.full((16, 16, 3), 255, np.uint8)),
    "numpy_rgba_onto_white": (lambda: np.zeros((16, 16, 4), np.uint8), lambda: np.full((16, 16, 3), 255, np.uint8)),
    "sixteen_bit_mid_grey": (lambda: _wide("I;16", 32896, 32896), lambda: np.full((16, 16, 3), 128, np.uint8)),
    "float_mode_quarter": (lambda: _wide("F", 0.25, 0.25), lambda: np.full((16, 16, 3), 64, np.uint8)),
    "palette_transparent_onto_white": (lambda: _palette(transparent=True),
                                       lambda: np.where(REGION[..., None], 0, 255).astype(np.uint8).repeat(3, -1)),
    "la_half_transparent_black": (lambda: Image.new("LA", (16, 16), (0, 128)),
                                  lambda: np.full((16, 16, 3), 127, np.uint8)),
    "numpy_grey_hw": (lambda: np.full((16, 16), 200, np.uint8), lambda: np.full((16, 16, 3), 200, np.uint8)),
}


@pytest.mark.parametrize("case", IMAGES)
def test_every_kind_of_image_means_its_pixels(case):
    given, expected = IMAGES[case]
    batch = image_batch(given(), 1, None, None)
    want = torch.from_numpy(expected()).permute(2, 0, 1).float()[None] / 127.5 - 1
    torch.testing.assert_close(batch, want, atol=1 / 127.5, rtol=0)


@pytest.fixture(scope="module")
def inpaint(tmp_path_factory) -> Inpaint:
    from tiny import make_tiny_pipeline

    root = tmp_path_factory.mktemp("inputs")
    make_tiny_pipeline(root).save_pretrained(root / "run" / "pipeline")
    return Inpaint.from_pretrained(root / "run")


def test_inpaint_reads_an_rgba_mask_by_its_alpha(inpaint):
    """Black strokes on a transparent layer: Pillow's "L" conversion made them an empty mask before."""
    image = torch.rand(3, 16, 16, generator=torch.Generator().manual_seed(1))
    known = inpaint.model.encode_images(image[None] * 2 - 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        out = inpaint("a red circle", image, _rgba((0, 0, 0)), output_type="latent", **FAST).images
    keep = torch.ones(8, dtype=torch.bool)
    keep[4] = False
    assert torch.equal(out[..., keep], known[..., keep])
    assert (out[..., 4] - known[..., 4]).abs().mean() > 0.05
    grey = Image.fromarray(REGION.astype(np.uint8) * 255, "L")
    assert torch.equal(inpaint("a red circle", image, grey, output_type="latent", **FAST).images, out)


def test_image_to_image_takes_numpy_and_integer_tensors_like_pil(inpaint):
    edit = ImageToImage.from_pipe(inpaint)
    pil = edit("a dog", Image.fromarray(_colours()), strength=0.0, output_type="pt", progress=False).images
    for same in (_colours(), torch.from_numpy(_colours()).permute(2, 0, 1), [_colours()]):
        torch.testing.assert_close(edit("a dog", same, strength=0.0, output_type="pt", progress=False).images, pil)

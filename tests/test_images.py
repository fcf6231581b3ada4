"""Image conversions and grids."""
import torch
from PIL import Image

from common.images import make_grid, pil_to_tensor, save_grid, tensor_to_pil


def test_pil_round_trip_is_exact_on_8_bit_values():
    pixels = torch.randint(0, 256, (3, 5, 7)).float() / 127.5 - 1
    assert torch.allclose(pil_to_tensor(tensor_to_pil(pixels)[0]), pixels, atol=1e-6)


def test_grid_tiles_row_major_with_padding():
    images = -torch.ones(6, 3, 4, 4)
    images[4] = 1.0  # the fifth tile (row 1, column 1 of a 4-column grid) is white
    grid = make_grid(images, columns=4, padding=2)
    assert grid.size == (4 * 6 + 2, 2 * 6 + 2)
    assert grid.getpixel((2 + 1, 8 + 1)) == (255, 255, 255) and grid.getpixel((8 + 1, 8 + 1)) == (0, 0, 0)


def test_row_labels_widen_the_grid_and_keep_the_tiles(tmp_path):
    images = torch.zeros(4, 3, 8, 8)
    plain = Image.open(save_grid(images, tmp_path / "plain.png", columns=2, scale=2))
    labelled = Image.open(save_grid(images, tmp_path / "labels.png", columns=2, scale=2, row_labels=["a dog", "b"]))
    assert labelled.height == plain.height and labelled.width > plain.width
    margin = labelled.width - plain.width
    assert labelled.crop((margin, 0, labelled.width, labelled.height)).tobytes() == plain.convert("RGB").tobytes()
    assert labelled.crop((0, 0, margin, plain.height)).convert("L").getextrema()[0] < 255  # some text drawn

"""Bad or surprising images, masks and image folders, each refused with a message that names the problem
and the fix, or handled with one warning that says what will happen (issue 12, "inputs converted as
users mean them"). What the accepted kinds convert to is in test_inputs.py and test_folder.py.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from bad_inputs import cli, refused, snapshot
from common.data.folder import CaptionWarning, FolderDataset, SkippedImagesWarning
from pipelines import ImageToImage, Inpaint
from pipelines.inputs import MaskWarning
from tiny import TINY_AUTOENCODER

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_thread")
FAST = {"num_inference_steps": 2, "progress": False, "seed": 0, "output_type": "latent"}


@pytest.fixture(scope="module")
def inpaint(tmp_path_factory) -> Inpaint:
    from tiny import make_tiny_pipeline

    root = tmp_path_factory.mktemp("conversion")
    make_tiny_pipeline(root).save_pretrained(root / "run" / "pipeline")
    return Inpaint.from_pretrained(root / "run")


def _image() -> np.ndarray:
    return np.full((16, 16, 3), 128, np.uint8)


# ------------------------------------------------------------------------- images and masks (pipelines/inputs.py)
IMAGE_CASES = {  # name -> (image, mask or None for ImageToImage, error, words)
    "float_tensor_in_0_255": (torch.full((3, 16, 16), 200.0), None, ValueError,
                              ("image tensor values must be in [0, 1]", "got [200, 200]", "divide it by 255")),
    "float_array_in_minus_1_1": (np.full((16, 16, 3), -0.5, np.float32), None, ValueError,
                                 ("image array values must be in [0, 1]", "pass (x + 1) / 2")),
    "nan_in_an_image_array": (np.full((16, 16, 3), np.nan, np.float32), None, ValueError,
                              ("image array holds NaN/inf", "finite values in [0, 1]")),
    "negative_integer_tensor": (torch.full((3, 16, 16), -3), None, ValueError,
                                ("image tensor of int64 holds negative values (-3)", "uint8 0..255")),
    "integers_beyond_16_bits": (np.full((16, 16, 3), 70000, np.int32), None, ValueError,
                                ("image array of int32 reaches 70000, beyond 16 bits", "uint16 0..65535")),
    "complex_array": (np.zeros((16, 16, 3), np.complex64), None, TypeError,
                      ("image array has dtype complex64", "float values in [0, 1] or uint8")),
    "two_channel_array": (np.zeros((16, 16, 2), np.uint8), None, ValueError,
                          ("image array must have shape (H, W), (H, W, C) or (N, H, W, C)", "(channels last)",
                           "(16, 16, 2)")),
    "file_path_instead_of_an_image": ("photo.png", None, TypeError,
                                      ("image must be a PIL image, a NumPy array", "got str",
                                       "PIL.Image.open(path)")),
    "empty_list_of_images": ([], None, ValueError, ("image is an empty list", "one per prompt")),
    "list_of_two_sizes": ([_image(), np.zeros((8, 16, 3), np.uint8)], None, ValueError,
                          ("image images differ in size (height, width): [(8, 16), (16, 16)]",)),
    "rgb_array_as_a_mask": (_image(), np.zeros((16, 16, 3), np.uint8), ValueError,
                            ("mask_image array of shape (16, 16, 3) looks like a colour image", "give one channel",
                             "Image.fromarray(mask)")),
    "mask_array_of_five_dimensions": (_image(), np.zeros((1, 1, 16, 16, 1), np.uint8), ValueError,
                                      ("mask_image array must have shape (H, W), (H, W, 1), (N, H, W) or "
                                       "(N, H, W, 1), got (1, 1, 16, 16, 1)",)),
    "float_mask_tensor_in_0_255": (_image(), torch.full((16, 16), 255.0), ValueError,
                                   ("mask_image tensor values must be in [0, 1]", "divide it by 255")),
    "mask_path_instead_of_an_image": (_image(), Path("mask.png"), TypeError,
                                      ("mask_image must be a PIL image", "PIL.Image.open(path)")),
}


@pytest.mark.parametrize("case", IMAGE_CASES)
def test_image_or_mask(case, inpaint):
    image, mask, error, words = IMAGE_CASES[case]
    given = [np.copy(x) if isinstance(x, np.ndarray) else x for x in (image, mask)]
    if mask is None:
        refused(lambda: ImageToImage.from_pipe(inpaint)("a dog", image, **FAST), *words, error=error)
    else:
        refused(lambda: inpaint("a dog", image, mask, **FAST), *words, error=error)
    for before, after in zip(given, (image, mask)):  # the caller's arrays are read, never written
        if isinstance(after, np.ndarray):
            np.testing.assert_array_equal(after, before)


MASK_WARNINGS = {  # name -> (mask, words of the one MaskWarning)
    "fully_transparent_rgba_mask": (Image.new("RGBA", (16, 16), (0, 0, 0, 0)),
                                    ("marks no pixel to regenerate: the edit does nothing",
                                     "the colours of a mode RGBA image (its alpha is the same everywhere)")),
    "all_white_mask": (Image.new("L", (16, 16), 255),
                       ("marks every pixel: the whole image is regenerated", "a mode L image, values [1, 1]")),
    "mask_too_dark_to_cut": (np.full((16, 16), 100, np.uint8),
                             ("marks no pixel", "a uint8 array, values [0.392, 0.392]", "pixels >= 0.5 regenerate")),
    "sixteen_bit_mask_all_dark": (Image.fromarray(np.full((16, 16), 2000, np.uint16)),
                                  ("marks no pixel", "a mode I;16 image scaled by its real range")),
}


@pytest.mark.parametrize("case", MASK_WARNINGS)
def test_a_mask_that_edits_nothing_or_everything_is_named(case, inpaint):
    mask, words = MASK_WARNINGS[case]
    with pytest.warns(MaskWarning) as record:
        inpaint("a dog", _image(), mask, **FAST)
    assert len(record) == 1
    for word in words:
        assert word in str(record[0].message), str(record[0].message)


# ------------------------------------------------------------------------- image folders (common/data/folder.py)
def _folder(root: Path, files: tuple[str, ...], lines: list[tuple[str, str]]) -> Path:
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (0, 128, 128)).save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in lines))
    return root


FOLDER_REFUSALS = {  # name -> (files, metadata lines, words)
    "metadata_name_matching_two_files": (("dog.png", "images/dog.png"), [("images/dog.png", "a dog")],
                                         ("line 1: file_name 'images/dog.png' matches both", "'dog.png'",
                                          "exact path relative to")),
    "two_captions_for_one_file": (("dog.png",), [("dog.png", "a dog"), ("./dog.png", "a wolf")],
                                  ("lines 1 and 2 give 'dog.png' two captions", "keep one of the lines")),
}


@pytest.mark.parametrize("case", FOLDER_REFUSALS)
def test_folder_metadata_refused(case, tmp_path):
    files, lines, words = FOLDER_REFUSALS[case]
    root = _folder(tmp_path / "images", files, lines)
    before = snapshot(root)
    refused(lambda: FolderDataset(root, 8), *words, error=ValueError)
    assert snapshot(root) == before


def test_folder_metadata_refused_at_the_training_command_line(tmp_path):
    root = _folder(tmp_path / "images", ("dog.png", "images/dog.png"), [("images/dog.png", "a dog")])
    (tmp_path / "ae.yaml").write_text(yaml.safe_dump(TINY_AUTOENCODER))
    before = snapshot(root)
    message = cli("autoencoder.train", str(tmp_path / "ae.yaml"), "data.name=folder", f"data.path={root}",
                  "run.cpu_threads=1", "run.steps=2", f"run.out_dir={tmp_path / 'run'}")
    assert message.startswith("error: ") and "matches both" in message and "\n" not in message
    assert snapshot(root) == before and not (tmp_path / "run" / "checkpoints").exists()


FOLDER_WARNINGS = {  # name -> (files, metadata lines, symlinks (link -> target, relative to root), class, words)
    "captions_for_missing_files": (("a.png",), [("a.png", "kept"), ("gone.png", "lost")], {}, CaptionWarning,
                                   ("1 file_name(s) match no image file ('gone.png')",)),
    "files_without_a_caption": (("a.png", "b.png"), [("a.png", "kept")], {}, CaptionWarning,
                                ("1 of 2 images have no line in it", "('b.png')", "captioned by their class")),
    "caption_outside_the_folder": (("a.png",), [("a.png", "kept"), ("/elsewhere/a.png", "x")], {}, CaptionWarning,
                                   ("match no image file ('/elsewhere/a.png')",)),
    "symlink_loop": (("a/a.png",), [("a/a.png", "kept")], {"a/up": "."}, SkippedImagesWarning,
                     ("Left out 1 folders", "a/up: symlink loop")),
}


@pytest.mark.parametrize("case", FOLDER_WARNINGS)
def test_folder_metadata_and_links_named_in_one_warning(case, tmp_path):
    files, lines, links, category, words = FOLDER_WARNINGS[case]
    root = _folder(tmp_path / "images", files, lines)
    for link, target in links.items():
        (root / link).symlink_to((root / target).resolve(), target_is_directory=True)
    before = snapshot(root) if not links else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = FolderDataset(root, 8)
    assert [w.category for w in caught] == [category]
    for word in words:
        assert word in str(caught[0].message), str(caught[0].message)
    assert dict(zip([p.name for p in dataset.files], dataset.captions))["a.png"] == "kept"
    assert before is None or snapshot(root) == before

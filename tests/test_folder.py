"""Tests of the image-folder dataset: captions, labels, odd modes and broken files."""
from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from common.data.folder import CaptionWarning, FolderDataset, SkippedImagesWarning, to_rgb


def _snapshot(root: Path) -> dict[str, str]:
    """Every entry under root (files and folders) with the SHA-256 of each file."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
    }


def _noise(size: tuple[int, int] = (48, 40), seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _make_odd_folder(root: Path) -> None:
    """3 good images, 2 convertible odd ones and 3 broken files."""
    _noise(seed=1).save(root / "good1.png")
    _noise(seed=2).save(root / "good2.jpg", quality=90)
    Image.new("RGB", (30, 50), (10, 200, 30)).save(root / "good3.bmp")
    Image.new("CMYK", (32, 32), (0, 255, 255, 0)).save(root / "cmyk.jpg")  # pure red in CMYK
    Image.fromarray(np.full((20, 24), 32768, dtype=np.uint16)).save(root / "grey16.png")
    buffer = root / "full.tmp"
    _noise((256, 256), seed=3).save(buffer, format="JPEG", quality=95)
    data = buffer.read_bytes()
    buffer.unlink()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("this is a text file, not a PNG\n")


def test_odd_folder_acceptance(tmp_path: Path) -> None:
    _make_odd_folder(tmp_path)
    before = _snapshot(tmp_path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    with pytest.warns(SkippedImagesWarning) as record:
        dataset = FolderDataset(tmp_path, 32)
    assert len(record) == 1
    message = str(record[0].message)
    for name in ("truncated.jpg", "empty.png", "notes.png"):
        assert name in message
    assert "3 of 8" in message
    assert sorted(name for name, _ in dataset.skipped) == ["empty.png", "notes.png", "truncated.jpg"]
    assert all(reason for _, reason in dataset.skipped)
    assert sorted(p.name for p in dataset.files) == ["cmyk.jpg", "good1.png", "good2.jpg", "good3.bmp", "grey16.png"]
    assert len(dataset) == 5
    for index in range(len(dataset)):
        item = dataset[index]
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert item["caption"] == "" and item["label"] == 0
    assert dict(dataset.skipped)["empty.png"] == "empty file (0 bytes)"
    assert _snapshot(tmp_path) == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_conversions_give_sensible_colours(tmp_path: Path) -> None:
    _make_odd_folder(tmp_path)
    with pytest.warns(SkippedImagesWarning):
        dataset = FolderDataset(tmp_path, 16)
    images = {p.name: dataset[i]["image"] for i, p in enumerate(dataset.files)}
    grey = images["grey16.png"]
    assert grey.abs().max() < 0.02  # 32768 / 65535 is mid-grey, i.e. 0 in [-1, 1]
    red = images["cmyk.jpg"].mean(dim=(1, 2))
    assert red[0] > 0.8 and red[1] < -0.6 and red[2] < -0.6
    green = images["good3.bmp"][:, 8, 8]
    assert torch.allclose(green, torch.tensor([10, 200, 30]) / 127.5 - 1, atol=0.02)


def test_palette_and_alpha_composite_on_white(tmp_path: Path) -> None:
    palette = Image.new("P", (16, 16), 0)
    palette.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    palette.paste(1, (0, 0, 8, 16))  # left half red, right half index 0 (transparent)
    palette.save(tmp_path / "palette.png", transparency=0)
    Image.new("LA", (16, 16), (0, 0)).save(tmp_path / "la.png")  # fully transparent black
    Image.new("RGBA", (16, 16), (255, 0, 0, 128)).save(tmp_path / "rgba.png")  # half red
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing here is broken: no warning at all
        dataset = FolderDataset(tmp_path, 16)
    images = {p.name: dataset[i]["image"] for i, p in enumerate(dataset.files)}
    assert torch.allclose(images["la.png"], torch.ones(3, 16, 16))
    assert torch.allclose(images["palette.png"][:, 4, 12], torch.ones(3))  # transparent -> white
    assert torch.allclose(images["palette.png"][:, 4, 2], torch.tensor([1.0, -1.0, -1.0]))
    half = images["rgba.png"][:, 8, 8]
    assert torch.allclose(half, torch.tensor([1.0, 0.0, 0.0]), atol=0.02)


def test_metadata_sidecars_and_precedence(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    for name in ("a.png", "b.png", "c.png", "sub/d.png"):
        _noise((20, 20)).save(tmp_path / name)
    lines = [
        {"file_name": "a.png", "text": "a red fox"},
        {"file_name": "./sub/d.png", "caption": "a deep lake"},
        {"file_name": "b.png", "text": "metadata wins"},
    ]
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    (tmp_path / "b.txt").write_text("sidecar loses\n")
    (tmp_path / "c.txt").write_text("  a cat on a mat \n")
    dataset = FolderDataset(tmp_path, 8)
    captions = {p.relative_to(tmp_path).as_posix(): c for p, c in zip(dataset.files, dataset.captions)}
    assert captions == {
        "a.png": "a red fox",
        "b.png": "metadata wins",
        "c.png": "a cat on a mat",
        "sub/d.png": "a deep lake",
    }
    assert dataset.classes == [] and set(dataset.labels) == {0}  # images at the root: no classes
    assert dataset[0]["caption"] == "a red fox"


def test_class_subfolders(tmp_path: Path) -> None:
    for folder, count in (("golden_retriever", 2), ("tabby-cat", 1), ("zebra", 1)):
        (tmp_path / folder / "deep").mkdir(parents=True)
        for k in range(count):
            _noise((30, 20), seed=k).save(tmp_path / folder / f"{k}.png")
    _noise((20, 30)).save(tmp_path / "zebra" / "deep" / "x.jpg")
    (tmp_path / "zebra" / "deep" / "x.txt").write_text("a zebra close up")
    dataset = FolderDataset(tmp_path, 12)
    assert dataset.classes == ["golden_retriever", "tabby-cat", "zebra"]
    assert list(zip(dataset.captions, dataset.labels)) == [
        ("golden retriever", 0),
        ("golden retriever", 0),
        ("tabby cat", 1),
        ("zebra", 2),
        ("a zebra close up", 2),  # the sidecar wins over the folder name, the label stays
    ]
    item = dataset[2]
    assert item["image"].shape == (3, 12, 12) and item["label"] == 1


def test_resize_is_shorter_side_and_centre_crop(tmp_path: Path) -> None:
    wide = np.zeros((10, 30, 3), dtype=np.uint8)
    wide[:, 10:20] = 255  # white centre third, black sides that the crop removes
    Image.fromarray(wide).save(tmp_path / "wide.png")
    image = FolderDataset(tmp_path, 10)[0]["image"]
    assert image.shape == (3, 10, 10) and image.min() > 0.9


def test_empty_or_all_broken_folder(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=str(tmp_path)):
        FolderDataset(tmp_path, 16)
    (tmp_path / "readme.md").write_text("no images")
    with pytest.raises(ValueError, match=str(tmp_path)):
        FolderDataset(tmp_path, 16)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff garbage")
    with pytest.warns(SkippedImagesWarning), pytest.raises(ValueError, match=str(tmp_path)):
        FolderDataset(tmp_path, 16)
    with pytest.raises(FileNotFoundError):
        FolderDataset(tmp_path / "missing", 16)


def test_sixteen_bit_and_wide_integer_modes() -> None:
    white16 = Image.fromarray(np.full((4, 4), 65535, dtype=np.uint16))
    assert to_rgb(white16).getpixel((0, 0)) == (255, 255, 255)
    # Older Pillows open 16-bit PNGs as mode "I": same 0..65535 scale.
    quarter = Image.fromarray(np.full((4, 4), 16384, dtype=np.int32), "I")
    assert to_rgb(quarter).getpixel((0, 0)) == (64, 64, 64)
    unit = Image.fromarray(np.full((4, 4), 0.5, dtype=np.float32), "F")
    assert to_rgb(unit).getpixel((0, 0)) == (128, 128, 128)


def test_threaded_validation_keeps_order(tmp_path: Path) -> None:
    for k in range(20):
        Image.new("L", (8, 8), k * 10).save(tmp_path / f"{k:02d}.png")
    (tmp_path / "05.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    with pytest.warns(SkippedImagesWarning, match="05.png"):
        dataset = FolderDataset(tmp_path, 8, workers=2)
    assert [p.name for p in dataset.files] == [f"{k:02d}.png" for k in range(20) if k != 5]
    assert dataset.skipped[0][0] == "05.png"
    assert dataset[-1]["image"][0, 0, 0].item() == pytest.approx(190 / 127.5 - 1, abs=1e-5)


def test_float_images_are_scaled_by_their_nominal_range_not_stretched() -> None:
    # A constant float image has no range to stretch: it used to turn black.
    assert to_rgb(Image.fromarray(np.full((4, 4), 100.0, dtype=np.float32), "F")).getpixel((0, 0)) == (100,) * 3
    # 8-bit values stored as float stay 8-bit values (they were stretched to their own maximum).
    ramp = Image.fromarray(np.array([[0.0, 50.0], [100.0, 200.0]], dtype=np.float32), "F")
    assert [to_rgb(ramp).getpixel(xy)[0] for xy in ((0, 0), (1, 0), (0, 1), (1, 1))] == [0, 50, 100, 200]
    nan = Image.fromarray(np.array([[np.nan, 1.0]], dtype=np.float32), "F")
    assert [to_rgb(nan).getpixel(xy) for xy in ((0, 0), (1, 0))] == [(0, 0, 0), (255, 255, 255)]


def _captioned(dataset: FolderDataset) -> dict[str, str]:
    return {p.relative_to(dataset.root).as_posix(): c for p, c in zip(dataset.files, dataset.captions)}


def test_metadata_names_match_through_prefixes_and_unicode_forms(tmp_path: Path) -> None:
    root = tmp_path / "data" / "train"
    (root / "sub").mkdir(parents=True)
    names = ("dog.png", "sub/cat.png", "abs.png", "cafe\u0301.png", "ni\u00f1o.png", "deep.png", "win.png")
    for name in names:
        _noise((8, 8)).save(root / name)
    lines = [("train/dog.png", "a dog"), ("./sub/cat.png", "a cat"), (str(root / "abs.png"), "absolute"),
             ("caf\u00e9.png", "NFC name, NFD file"), ("nin\u0303o.png", "NFD name, NFC file"),
             ("data/train/deep.png", "two folders in front"), (".\\win.png", "Windows separator")]
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in lines))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every line and every file matched: no warning
        dataset = FolderDataset(root, 8)
    assert sorted(_captioned(dataset).values()) == sorted(text for _, text in lines)


def test_unmatched_lines_and_uncaptioned_files_are_named_in_one_warning(tmp_path: Path) -> None:
    for name in ("a.png", "b.png", "c.png"):
        _noise((8, 8)).save(tmp_path / name)
    (tmp_path / "c.txt").write_text("a sidecar caption")
    lines = [{"file_name": "a.png", "text": "matched"}] + [{"file_name": f"gone{k}.png", "text": "x"} for k in range(7)]
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines) + "not json\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        dataset = FolderDataset(tmp_path, 8)
    assert len(caught) == 1 and issubclass(caught[0].category, CaptionWarning)
    message = str(caught[0].message)
    assert "7 file_name(s) match no image file ('gone0.png', 'gone1.png', 'gone2.png', 'gone3.png', 'gone4.png'" \
           " and 2 more)" in message
    assert "1 of 3 images have no line in it and no .txt beside them ('b.png')" in message
    assert "ignored malformed lines [9]" in message and str(tmp_path) in message
    assert _captioned(dataset) == {"a.png": "matched", "b.png": "", "c.png": "a sidecar caption"}


@pytest.mark.parametrize("case", ["prefix_and_subfolder", "two_unicode_forms_on_disk", "two_captions"])
def test_an_ambiguous_metadata_line_is_an_error_naming_both(case: str, tmp_path: Path) -> None:
    root = tmp_path / "train"
    (root / "train").mkdir(parents=True)
    first, second, lines = {
        "prefix_and_subfolder": ("train/dog.png", "dog.png", [("train/dog.png", "a dog")]),
        "two_unicode_forms_on_disk": ("caf\u00e9.png", "cafe\u0301.png", [("caf\u00e9.png", "a cafe")]),
        "two_captions": ("dog.png", "dog.png", [("dog.png", "a dog"), ("./dog.png", "a wolf")]),
    }[case]
    for name in (first, second):
        _noise((8, 8)).save(root / name)
    (root / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": t}) + "\n" for n, t in lines))
    before = _snapshot(root)
    with pytest.raises(ValueError) as caught:
        FolderDataset(root, 8)
    message = str(caught.value)
    if case == "two_captions":
        assert "lines 1 and 2 give 'dog.png' two captions (as 'dog.png' and './dog.png'); keep one" in message
    else:
        assert f"matches both {first!r} and {second!r}" in message or f"matches both {second!r} and {first!r}" \
            in message
        assert "write the image's exact path relative to" in message
    assert _snapshot(root) == before


def test_symlinked_class_folders_and_images_are_followed_and_loops_named(tmp_path: Path) -> None:
    outside, root = tmp_path / "elsewhere", tmp_path / "data"
    (outside / "cats").mkdir(parents=True)
    (root / "dogs").mkdir(parents=True)
    for k in range(2):
        _noise((8, 8), seed=k).save(outside / "cats" / f"{k}.png")
    _noise((8, 8)).save(root / "dogs" / "real.png")
    _noise((8, 8)).save(outside / "single.png")
    (root / "cats").symlink_to(outside / "cats", target_is_directory=True)
    (root / "dogs" / "linked.png").symlink_to(outside / "single.png")
    (root / "dogs" / "loop").symlink_to(root, target_is_directory=True)
    with pytest.warns(SkippedImagesWarning) as record:
        dataset = FolderDataset(root, 8)
    assert len(record) == 1 and "Left out 1 folders" in str(record[0].message)
    assert "dogs/loop: symlink loop" in str(record[0].message)
    assert dataset.classes == ["cats", "dogs"]
    assert _captioned(dataset) == {"cats/0.png": "cats", "cats/1.png": "cats", "dogs/linked.png": "dogs",
                                   "dogs/real.png": "dogs"}
    assert dataset.labels == [0, 0, 1, 1] and dataset[0]["image"].shape == (3, 8, 8)

"""Tests for plan_hf.image_processing_plan: loading (8/16-bit, colour, DICOM), geometry, maps back, save/load, errors."""

import io
import json
import struct
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from plan_hf.image_processing_plan import (
    DEFAULT_MAX_IMAGE_PIXELS,
    ImageTooLargeError,
    PlanImageProcessor,
    boxes_to_original,
    boxes_to_processed,
    compute_content_box,
    heatmap_to_original,
    load_image,
    read_dicom,
)


pydicom = pytest.importorskip("pydicom")
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid  # noqa: E402


RNG = np.random.default_rng(0)
IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def min_max(values: np.ndarray) -> np.ndarray:
    values = values.astype(np.float64)
    return (values - values.min()) / (values.max() - values.min())


def make_dicom(pixels: np.ndarray, photometric: str = "MONOCHROME2", **attributes) -> Dataset:
    """A small single-frame 12-bit CR dataset with file meta, as a modality would write it."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    for key, value in attributes.items():
        setattr(ds, key, value)
    return ds


def save_dicom(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def ramp12() -> np.ndarray:
    """A 12-bit horizontal ramp 0..4095 with some texture, (32, 64)."""
    ramp = np.linspace(0, 4095, 64)[None, :].repeat(32, axis=0)
    ramp[::4] = 4095 - ramp[::4]
    return ramp.round().astype(np.uint16)


# ----------------------------------------------------------------------------------------------------- loading arrays


def test_uint8_is_divided_by_255_not_stretched():
    image = RNG.integers(10, 200, size=(224, 224), dtype=np.uint8)  # does not span 0..255
    np.testing.assert_allclose(load_image(image), image / 255.0, atol=1e-6)
    # Same size in, same size out: no resize blur, so the normalisation is checked exactly, on every channel.
    pixels = PlanImageProcessor()(image, return_tensors="np")["pixel_values"]
    assert pixels.shape == (1, 3, 224, 224) and pixels.dtype == np.float32
    for channel in pixels[0]:
        np.testing.assert_allclose(channel, (image / 255.0 - 0.5) / 0.5, atol=1e-5)


def test_uint16_depth_is_scaled_by_the_image_range(ramp12):
    full16 = ramp12 * 16  # the same picture stored with the full 16-bit range
    assert full16.max() > 60000 and ramp12.max() == 4095
    out12, out16 = load_image(ramp12), load_image(full16)
    np.testing.assert_allclose(out12, min_max(ramp12), atol=1e-6)
    np.testing.assert_allclose(out12, out16, atol=1e-6)
    assert len(np.unique(out12)) > 60  # not quantised to 8 bits on the way
    np.testing.assert_allclose(load_image(ramp12.astype(np.int16) - 2048), out12, atol=1e-6)


def test_float_is_min_max_and_constant_images_are_zeros():
    image = RNG.normal(3.0, 2.0, size=(20, 30))
    np.testing.assert_allclose(load_image(image), min_max(image), atol=1e-6)
    for constant in (np.full((8, 8), 7, np.uint16), np.full((8, 8), 0.3), np.full((8, 8), -5, np.int32)):
        out = load_image(constant)
        assert out.dtype == np.float32 and not out.any()
    assert np.isfinite(PlanImageProcessor()(np.full((9, 9), 0.3), return_tensors="np")["pixel_values"]).all()


def test_rgb_becomes_luma_like_pil():
    image = RNG.integers(0, 256, size=(16, 24, 3), dtype=np.uint8)
    expected = np.asarray(Image.fromarray(image).convert("L"), dtype=np.float64) / 255
    np.testing.assert_allclose(load_image(image), expected, atol=1.0 / 255)
    grey = RNG.integers(0, 256, size=(16, 24), dtype=np.uint8)
    np.testing.assert_allclose(load_image(np.stack([grey] * 3, -1)), load_image(grey), atol=1e-6)
    np.testing.assert_allclose(load_image(grey[..., None]), load_image(grey))
    np.testing.assert_allclose(load_image(Image.fromarray(image)), load_image(image))


def test_rgba_alpha_is_composited_onto_black_consistently():
    rgb = RNG.integers(0, 256, size=(10, 12, 3), dtype=np.uint8)
    opaque = np.concatenate([rgb, np.full((10, 12, 1), 255, np.uint8)], axis=-1)
    np.testing.assert_allclose(load_image(opaque), load_image(rgb), atol=1e-6)

    half = opaque.copy()
    half[:, :6, 3] = 0
    out = load_image(half)
    assert not out[:, :6].any()
    np.testing.assert_allclose(out[:, 6:], load_image(rgb)[:, 6:], atol=1e-6)
    # The PIL route (RGBA, LA, P with transparency) gives the same as the array route.
    np.testing.assert_allclose(load_image(Image.fromarray(half, "RGBA")), out, atol=1e-6)
    grey = rgb[..., 0]
    la = Image.fromarray(np.stack([grey, half[..., 3]], -1), "LA")
    np.testing.assert_allclose(load_image(la)[:, 6:], grey[:, 6:] / 255, atol=1e-6)
    assert not load_image(la)[:, :6].any()


def test_pil_16bit_png_keeps_its_depth(tmp_path):
    levels = np.arange(0, 4096, 8, dtype=np.uint16).reshape(16, 32)  # 512 distinct 12-bit levels
    path = tmp_path / "cxr16.png"
    Image.fromarray(levels).save(path)
    with Image.open(path) as reopened:
        assert reopened.mode in ("I;16", "I")  # really a 16-bit file
    out = load_image(path)
    np.testing.assert_allclose(out, min_max(levels), atol=1e-6)
    assert len(np.unique(out)) == 512  # an 8-bit detour would leave at most 256
    np.testing.assert_array_equal(load_image(str(path)), out)
    np.testing.assert_allclose(load_image(Image.fromarray(levels)), out, atol=1e-6)


def test_jpeg_path_bytes_and_datasets_dict(tmp_path):
    grey = np.linspace(0, 255, 48)[None, :].repeat(40, axis=0).astype(np.uint8)
    path = tmp_path / "cxr.jpg"
    Image.fromarray(grey).save(path, quality=95)
    out = load_image(path)
    assert out.shape == (40, 48)
    np.testing.assert_allclose(out, grey / 255, atol=0.03)
    np.testing.assert_array_equal(load_image(path.read_bytes()), out)
    np.testing.assert_array_equal(load_image({"bytes": path.read_bytes(), "path": None}), out)
    np.testing.assert_array_equal(load_image({"bytes": None, "path": str(path)}), out)


def test_torch_tensors_are_channels_first():
    rgb = RNG.random((12, 20, 3)).astype(np.float32)
    np.testing.assert_allclose(load_image(torch.from_numpy(rgb).permute(2, 0, 1)), load_image(rgb), atol=1e-6)
    grey = RNG.random((12, 20)).astype(np.float32)
    np.testing.assert_allclose(load_image(torch.from_numpy(grey)), load_image(grey), atol=1e-6)


# ------------------------------------------------------------------------------------------------------------ DICOM


def test_monochrome1_is_inverted_from_path_and_dataset(tmp_path, ramp12):
    mono2 = save_dicom(make_dicom(ramp12, "MONOCHROME2"), tmp_path / "mono2.dcm")
    mono1_ds = make_dicom(ramp12, "MONOCHROME1")
    mono1 = save_dicom(mono1_ds, tmp_path / "mono1.dcm")
    out2, out1 = read_dicom(mono2), read_dicom(mono1)
    np.testing.assert_allclose(out2, min_max(ramp12), atol=1e-6)
    np.testing.assert_allclose(out1, 1.0 - out2, atol=1e-6)
    # Path, str, Dataset object and the generic loader all agree.
    np.testing.assert_array_equal(read_dicom(mono1_ds), out1)
    np.testing.assert_array_equal(load_image(pydicom.dcmread(mono1)), out1)
    np.testing.assert_array_equal(load_image(str(mono1)), out1)


def test_dicom_found_by_magic_without_suffix_and_without_preamble(tmp_path, ramp12):
    ds = make_dicom(ramp12, "MONOCHROME1")
    expected = read_dicom(ds)
    no_suffix = save_dicom(ds, tmp_path / "image_without_suffix")
    np.testing.assert_array_equal(load_image(no_suffix), expected)
    np.testing.assert_array_equal(load_image(no_suffix.read_bytes()), expected)
    raw = tmp_path / "raw_dataset"  # no preamble, no 'DICM': only pydicom's forced read knows it
    ds.save_as(raw, enforce_file_format=False)
    assert raw.read_bytes()[128:132] != b"DICM"
    np.testing.assert_array_equal(load_image(raw), expected)


def test_dicom_rescale_slope_and_intercept_are_applied(ramp12):
    # A negative slope turns the stored values upside down: an implementation skipping the rescale would not.
    out = read_dicom(make_dicom(ramp12, RescaleSlope=-1, RescaleIntercept=4095))
    np.testing.assert_allclose(out, 1.0 - min_max(ramp12), atol=1e-6)


def test_dicom_window_clips_in_rescaled_units(ramp12):
    # Hounsfield-like units: stored - 1024; the window [-500, 500] is stored [524, 1524].
    ds = make_dicom(ramp12, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=0, WindowWidth=1000)
    out = read_dicom(ds)
    assert (out[ramp12 <= 520] == 0).all() and (ramp12 <= 520).any()
    assert (out[ramp12 >= 1530] == 1).all() and (ramp12 >= 1530).any()
    inside = (ramp12 > 600) & (ramp12 < 1450)
    np.testing.assert_allclose(out[inside], (ramp12[inside] - 524.0) / 1000.0, atol=0.01)


def test_dicom_constant_monochrome1_gives_zeros():
    out = read_dicom(make_dicom(np.full((6, 6), 300), "MONOCHROME1"))
    assert out.shape == (6, 6) and not out.any()


def test_real_cr_chest_radiograph_monochrome1():
    data_store = pytest.importorskip("data_store", reason="pydicom-data (RG1_UNCR.dcm) is not installed")
    path = Path(data_store.__file__).parent / "data" / "RG1_UNCR.dcm"
    if not path.is_file():
        pytest.skip(f"{path} is missing from pydicom-data")
    assert pydicom.dcmread(path, stop_before_pixels=True).PhotometricInterpretation == "MONOCHROME1"
    grey = load_image(path)
    height, width = grey.shape
    assert (height, width) == (1955, 1841) and grey.min() == 0 and grey.max() == 1
    upper = slice(int(0.15 * height), int(0.45 * height))

    def band(start: float, stop: float) -> float:
        return float(grey[upper, int(start * width) : int(stop * width)].mean())

    right_lung, mediastinum, left_lung = band(0.25, 0.35), band(0.45, 0.55), band(0.65, 0.75)
    # Aerated lungs are dark and the mediastinum bright once MONOCHROME1 is inverted; not inverting swaps them.
    assert mediastinum > right_lung + 0.2 and mediastinum > left_lung + 0.2
    pixels = PlanImageProcessor()(path, return_tensors="pt")
    assert pixels["original_sizes"].tolist() == [[1955, 1841]]
    assert pixels["content_boxes"].tolist() == [[0, 6, 224, 211]]


# --------------------------------------------------------------------------------------------------------- geometry


@pytest.mark.parametrize(
    ("shape", "pad_mode", "box"),
    [
        ((100, 200), "center", (56, 0, 112, 224)),
        ((100, 200), "bottom_right", (0, 0, 112, 224)),
        ((200, 100), "center", (0, 56, 224, 112)),
        ((50, 50), "center", (0, 0, 224, 224)),
    ],
)
def test_aspect_keeping_resize_and_padding(shape, pad_mode, box):
    image = np.full(shape, 200, np.uint8)
    out = PlanImageProcessor(pad_mode=pad_mode)(image, return_tensors="np")
    pixels = out["pixel_values"][0]
    assert out["content_boxes"].tolist() == [list(box)] and out["original_sizes"].tolist() == [list(shape)]
    top, left, height, width = box
    content = np.zeros((224, 224), bool)
    content[top : top + height, left : left + width] = True
    assert (pixels[:, ~content] == -1.0).all()  # (0 - 0.5) / 0.5: black padding
    np.testing.assert_allclose(pixels[:, content], (200 / 255 - 0.5) / 0.5, atol=1e-5)


def test_pad_value_follows_custom_normalisation_and_channels():
    processor = PlanImageProcessor(size=32, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
    pixels = processor(np.full((10, 20), 255, np.uint8), return_tensors="pt")["pixel_values"][0]
    for channel, (mean, std) in enumerate(zip(IMAGENET_MEAN, IMAGENET_STD)):
        assert torch.allclose(pixels[channel, 0, 0], torch.tensor(-mean / std))
        assert torch.allclose(pixels[channel, 16, 16], torch.tensor((1 - mean) / std))
    one = PlanImageProcessor(size=32, num_channels=1, do_normalize=False)(np.full((10, 20), 255, np.uint8))
    assert one["pixel_values"][0].shape == (1, 32, 32) and one["pixel_values"][0].max() == 1.0


def test_batch_of_mixed_inputs_and_return_types(tmp_path, ramp12):
    dicom = save_dicom(make_dicom(ramp12), tmp_path / "a.dcm")
    batch = [np.zeros((30, 40), np.uint8), Image.new("RGB", (50, 20)), dicom, make_dicom(ramp12, "MONOCHROME1")]
    processor = PlanImageProcessor(size=64)
    as_lists = processor(batch)
    assert isinstance(as_lists["pixel_values"], list) and len(as_lists["pixel_values"]) == 4
    as_pt = processor(images=batch, return_tensors="pt")
    assert as_pt["pixel_values"].shape == (4, 3, 64, 64) and as_pt["pixel_values"].dtype == torch.float32
    assert as_pt["original_sizes"].tolist() == [[30, 40], [20, 50], [32, 64], [32, 64]]
    np.testing.assert_array_equal(as_pt["pixel_values"].numpy(), np.stack(as_lists["pixel_values"]))
    # The MONOCHROME1 copy is the inverse of the MONOCHROME2 one inside the content box.
    content = as_pt["pixel_values"][2:, :, 16:48]
    torch.testing.assert_close(content[0], -content[1], atol=1e-5, rtol=0)
    assert set(processor(batch[0], return_geometry=False)) == {"pixel_values"}


# --------------------------------------------------------------------------------------------------- maps back


@pytest.mark.parametrize("pad_mode", ["center", "bottom_right"])
def test_heatmap_quadrant_maps_back_to_the_original_quadrant(pad_mode):
    original = (100, 200)
    processor = PlanImageProcessor(pad_mode=pad_mode)
    box = processor(np.zeros(original, np.uint8), return_tensors="np")["content_boxes"][0]
    top, left, height, width = box.tolist()
    heatmap = np.zeros((224, 224), np.float32)
    heatmap[top : top + height // 2, left : left + width // 2] = 1.0
    mapped = processor.heatmap_to_original(torch.from_numpy(heatmap), original, box)
    assert mapped.shape == original and mapped.dtype == np.float32
    truth = np.zeros(original, bool)
    truth[:50, :100] = True
    predicted = mapped > 0.5
    assert (predicted & truth).sum() / (predicted | truth).sum() > 0.95
    assert mapped[10, 10] > 0.99 and mapped[80, 150] < 0.01 and mapped[80, 20] < 0.01 and mapped[10, 180] < 0.01


def test_heatmap_linear_ramps_are_carried_exactly():
    # Maps equal to the processed x (y) coordinate must read, on the original, the processed x (y) of each original
    # pixel centre: a wrong offset, scale or half-pixel convention is off by 0.5 pixel or more.
    original, side = (100, 200), 224
    top, left, height, width = box = compute_content_box(original, side, "center")
    assert box == (56, 0, 112, 224)
    coordinate = np.arange(side, dtype=np.float32) + 0.5
    along_x = heatmap_to_original(np.tile(coordinate, (side, 1)), original, box)
    along_y = heatmap_to_original(np.tile(coordinate[:, None], (1, side)), original, box)
    expected_x = left + (np.arange(original[1]) + 0.5) * width / original[1]
    expected_y = top + (np.arange(original[0]) + 0.5) * height / original[0]
    # 0.1 pixel: PIL's resampling windows are cut to whole pixels, which bends a ramp by up to ~0.07.
    np.testing.assert_allclose(along_x[50, 3:-3], expected_x[3:-3], atol=0.1)
    np.testing.assert_allclose(along_y[3:-3, 100], expected_y[3:-3], atol=0.1)
    assert np.isfinite(along_x).all() and np.isfinite(along_y).all()


def test_coarse_grid_heatmap_and_fill_outside():
    original = (70, 70)  # fills the whole square: one 7x7 cell is 10x10 original pixels
    heatmap = torch.zeros(7, 7)
    heatmap[0, 0] = 1.0
    mapped = heatmap_to_original(heatmap, original, (0, 0, 224, 224))
    assert mapped[2, 2] > 0.95 and mapped[40, 40] == 0 and mapped[2, 40] == 0
    # A box reaching outside the square (not one this processor makes) gets fill_outside there.
    shifted = heatmap_to_original(np.ones((7, 7)), (70, 70), (-20, 0, 224, 224), input_size=224)
    assert np.isnan(shifted[:3]).all() and np.allclose(shifted[10:], 1.0)


def test_boxes_round_trip_and_land_on_the_processed_pixels():
    original = (100, 200)
    image = np.zeros(original, np.uint8)
    image[20:50, 40:100] = 255  # (x, y, w, h) = (40, 20, 60, 30)
    processor = PlanImageProcessor()
    out = processor(image, return_tensors="np")
    box = out["content_boxes"][0]
    x, y, w, h = processor.boxes_to_processed([40, 20, 60, 30], original, box)
    np.testing.assert_allclose([x, y, w, h], [44.8, 56 + 22.4, 67.2, 33.6])
    pixels = out["pixel_values"][0, 0]
    inner = pixels[int(y) + 2 : int(y + h) - 2, int(x) + 2 : int(x + w) - 2]
    assert (inner > 0.99).all() and pixels[int(y) - 3, int(x) + 5] == -1.0 and pixels[int(y) + 5, int(x + w) + 3] == -1

    boxes = RNG.uniform(0, 100, size=(5, 4))
    there = boxes_to_processed(boxes, original, box)
    np.testing.assert_allclose(boxes_to_original(there, original, box), boxes, atol=1e-9)
    np.testing.assert_allclose(boxes_to_processed([0, 0, 200, 100], original, box), [0, 56, 224, 112])


# ------------------------------------------------------------------------------------------------------ save / load


def test_save_and_load_round_trip(tmp_path):
    processor = PlanImageProcessor(
        size=48, pad_mode="bottom_right", image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD, num_channels=3
    )
    processor.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "preprocessor_config.json").read_text())
    assert config["image_processor_type"] == "PlanImageProcessor"
    assert config["pad_mode"] == "bottom_right" and config["size"] == {"height": 48, "width": 48}
    reloaded = PlanImageProcessor.from_pretrained(tmp_path)
    assert reloaded.to_dict() == processor.to_dict()
    image = RNG.integers(0, 4096, size=(60, 90)).astype(np.uint16)
    first, second = processor(image, return_tensors="pt"), reloaded(image, return_tensors="pt")
    for key in ("pixel_values", "original_sizes", "content_boxes"):
        assert torch.equal(first[key], second[key])
    assert PlanImageProcessor.from_pretrained(tmp_path, size=32)(image, return_tensors="pt")["pixel_values"].shape[
        -1
    ] == 32


# ----------------------------------------------------------------------------------------------------------- errors


def _bad_dicom(tmp_path: Path) -> Path:
    ds = make_dicom(np.zeros((4, 4)))
    del ds.PixelData
    return save_dicom(ds, tmp_path / "no_pixels.dcm")


@pytest.mark.parametrize(
    ("make_input", "match"),
    [
        (lambda tmp: tmp / "missing.png", r"missing\.png: no such file"),
        (lambda tmp: (tmp / "garbage.png").write_bytes(b"not an image at all" * 20) and tmp / "garbage.png",
         r"garbage\.png: cannot read"),
        (_bad_dicom, r"no_pixels\.dcm: DICOM has no pixel data"),
        (lambda tmp: np.zeros((0, 5), np.uint8), r"shape \(0, 5\).*empty"),
        (lambda tmp: np.zeros(5), r"shape \(5,\)"),
        (lambda tmp: np.zeros((1, 2, 3, 4)), r"shape \(1, 2, 3, 4\)"),
        (lambda tmp: np.zeros((4, 4, 2), np.uint8), r"shape \(4, 4, 2\)"),
        (lambda tmp: np.zeros((4, 4, 5), np.uint8), r"shape \(4, 4, 5\)"),
        (lambda tmp: np.zeros((4, 4), np.complex64), r"dtype complex64"),
        (lambda tmp: np.zeros((4, 4), bool), r"dtype bool"),
        (lambda tmp: np.array([[0.0, np.nan], [1.0, 2.0]]), r"shape \(2, 2\).*NaN"),
        (lambda tmp: torch.zeros(5, 4, 3), r"tensor of shape \(5, 4, 3\).*channels-first"),
        (lambda tmp: 42, r"type int"),
    ],
)
def test_bad_inputs_raise_value_error_naming_them(tmp_path, make_input, match):
    bad = make_input(tmp_path)
    with pytest.raises(ValueError, match=match):
        load_image(bad)
    batch = [np.zeros((4, 4), np.uint8)] * 3 + [bad]
    with pytest.raises(ValueError, match=r"image at index 3 of the batch: .*" + match):
        PlanImageProcessor(size=8)(batch)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"pad_mode": "left"}, "pad_mode"),
        ({"size": {"height": 224, "width": 100}}, "size"),
        ({"size": 0}, "size"),
        ({"image_mean": [0.1, 0.2]}, "image_mean"),
        ({"image_std": 0.0}, "image_std"),
        ({"num_channels": 0}, "num_channels"),
    ],
)
def test_bad_settings_raise_value_error_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PlanImageProcessor(**kwargs)


def test_empty_batch_and_bad_heatmap_or_boxes():
    with pytest.raises(ValueError, match="images: empty list"):
        PlanImageProcessor()([])
    with pytest.raises(ValueError, match="heatmap"):
        heatmap_to_original(np.zeros((2, 7, 7)), (10, 10), (0, 0, 224, 224))
    with pytest.raises(ValueError, match="boxes_xywh"):
        boxes_to_processed([1, 2, 3], (10, 10), (0, 0, 224, 224))


# ------------------------------------------------------------------------------------------------- size and memory


def png_claiming_size(width: int, height: int) -> bytes:
    """A PNG whose header says width x height while its data is a 1x1 picture's: decoding it fails, so only a size
    check made on the header, before decoding, can name its size."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    png = bytearray(buffer.getvalue())
    png[16:24] = struct.pack(">II", width, height)  # IHDR data starts after the signature, length and type
    png[29:33] = struct.pack(">I", zlib.crc32(bytes(png[12:29])))  # the IHDR chunk's CRC over type + data
    return bytes(png)


def peak_bytes(function, *args, **kwargs) -> int:
    """Peak memory numpy (and Python) allocate while `function` runs."""
    tracemalloc.start()
    try:
        function(*args, **kwargs)
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak


def test_too_large_images_are_refused_before_decoding(tmp_path, ramp12):
    assert DEFAULT_MAX_IMAGE_PIXELS == 100_000_000
    path = tmp_path / "film.png"
    path.write_bytes(png_claiming_size(12000, 12000))
    with pytest.raises(ImageTooLargeError, match=r"film\.png: 12000 x 12000 pixels \(144\.0 megapixels\) is more than "
                                                 r"max_image_pixels=100000000"):
        load_image(path)
    with pytest.raises(ImageTooLargeError, match="encoded image bytes: 12000 x 12000"):
        PlanImageProcessor()(path.read_bytes())
    with pytest.raises(ValueError, match=r"film\.png: cannot read as an image"):  # what decoding it would have said
        load_image(path, max_pixels=None)

    # An array is refused before any float copy of it is made.
    rgb = np.zeros((3000, 1000, 3), np.uint8)
    processor = PlanImageProcessor(size=16, max_image_pixels=1_000_000)
    with pytest.raises(ImageTooLargeError, match=r"image at index 1 of the batch: .*1000 x 3000 pixels"):
        processor([np.zeros((8, 8), np.uint8), rgb])

    def refuse():
        with pytest.raises(ImageTooLargeError):
            load_image(rgb, max_pixels=1_000_000)

    assert peak_bytes(refuse) < rgb.size // 100  # nothing of the image's size was allocated
    assert processor(rgb, max_image_pixels=3_000_000, return_tensors="pt")["pixel_values"].shape == (1, 3, 16, 16)
    assert PlanImageProcessor(size=16, max_image_pixels=None)(rgb, return_tensors="np")["original_sizes"].tolist() == [
        [3000, 1000]]
    with pytest.raises(ImageTooLargeError, match=r"tensor of shape \(3, 3000, 1000\)"):
        processor(torch.zeros(3, 3000, 1000, dtype=torch.bfloat16))

    # DICOM: Rows x Columns is checked before the pixel data is decoded (here it could not be: it is truncated).
    dataset = make_dicom(ramp12)
    dataset.PixelData = dataset.PixelData[:100]
    with pytest.raises(ImageTooLargeError, match=r"64 x 32 pixels"):
        read_dicom(dataset, max_pixels=1000)
    with pytest.raises(ValueError, match="cannot decode DICOM pixel data"):
        read_dicom(dataset)

    processor.save_pretrained(tmp_path)
    assert PlanImageProcessor.from_pretrained(tmp_path).max_image_pixels == 1_000_000
    with pytest.raises(ValueError, match="max_image_pixels"):
        PlanImageProcessor(max_image_pixels=0)


@pytest.mark.parametrize(
    ("make_image", "float32_maps"),
    [
        (lambda: RNG.integers(0, 256, size=(1000, 1000, 3), dtype=np.uint8), 2),  # the grey image + one channel
        (lambda: RNG.integers(0, 256, size=(1000, 1000, 4), dtype=np.uint8), 3),  # + the alpha
        (lambda: RNG.integers(0, 4096, size=(1000, 1000), dtype=np.uint16), 1),  # min-max straight into float32
        (lambda: RNG.normal(size=(1000, 1000)), 1),
    ],
)
def test_loading_works_in_float32(make_image, float32_maps):
    """No float64 copy of the image is made (it cost 3.5 GB for a 12000 x 12000 RGB film): the peak is a few float32
    (H, W) maps plus the resampling buffers."""
    image = make_image()
    pixels = image.shape[0] * image.shape[1]
    assert load_image(image).dtype == np.float32
    assert peak_bytes(load_image, image) < (float32_maps + 0.1) * 4 * pixels
    assert peak_bytes(PlanImageProcessor(size=224), image) < (float32_maps + 0.5) * 4 * pixels


def test_nested_lists_of_images_are_flattened_in_order():
    images = [RNG.integers(0, 256, size=(20 + i, 30), dtype=np.uint8) for i in range(3)]
    processor = PlanImageProcessor(size=16)
    flat = processor(images, return_tensors="pt")
    nested = processor([[images[0]], [], [images[1], images[2]]], return_tensors="pt")
    for key in ("pixel_values", "original_sizes", "content_boxes"):
        assert torch.equal(nested[key], flat[key])
    with pytest.raises(ValueError, match="image at index 2 of the batch"):
        processor([[images[0]], [images[1], "missing.png"]])

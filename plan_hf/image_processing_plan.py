"""Chest-X-ray image processor: reads 8/16-bit pictures and DICOM, resizes keeping the aspect ratio, pads to a square,
and maps heat maps and boxes between the model's square input and the original image."""

import io
import os
import sys
import warnings
from enum import Enum
from pathlib import Path
from typing import Any, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.processing_utils import ImagesKwargs
from transformers.utils import logging


logger = logging.get_logger(__name__)

# Sources other than arrays: a file path, encoded bytes, a `datasets.Image(decode=False)` dict or a pydicom Dataset.
ImageSource = Union[str, os.PathLike, bytes, dict, Image.Image, np.ndarray, torch.Tensor, Any]

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
# ITU-R BT.601 luma, the weights of PIL's convert("L"), applied in float so 16-bit colour keeps its depth.
LUMA_WEIGHTS = (0.299, 0.587, 0.114)
# Larger inputs are refused before they are decoded: a 12000 x 12000 film is 144 megapixels, and a chest X-ray needs
# no more than about 4000 x 5000 (20 megapixels).
DEFAULT_MAX_IMAGE_PIXELS = 100_000_000
# PIL modes read as they are; every other mode is first converted to RGBA (if it can carry alpha) or RGB.
_DIRECT_PIL_MODES = {"L", "I", "F", "I;16", "I;16L", "I;16B", "I;16N", "RGB", "RGBA"}
_ALPHA_PIL_MODES = {"LA", "La", "PA", "P", "RGBa"}


class PadMode(str, Enum):
    """Where the resized image sits inside the padded square."""

    CENTER = "center"
    BOTTOM_RIGHT = "bottom_right"  # image in the top-left corner, padding below and to the right


class PlanImageProcessorKwargs(ImagesKwargs, total=False):
    pad_mode: str | None
    num_channels: int | None
    return_geometry: bool | None
    max_image_pixels: int | None


class ImageTooLargeError(ValueError):
    """An input image has more pixels than the processor's `max_image_pixels`; raised before it is decoded."""


# --------------------------------------------------------------------------------------------------------------------
# Loading: anything -> float32 (H, W) in [0, 1], bright = dense (bone), dark = air. Every step works in float32 (the
# input's own precision where it is finer, one float32 (H, W) array at a time), so a large film costs a few bytes per
# pixel, not a float64 copy per channel.
# --------------------------------------------------------------------------------------------------------------------


def _describe(image: Any) -> str:
    """A short name of an input for error messages."""
    if isinstance(image, np.ndarray):
        return f"array of shape {image.shape} and dtype {image.dtype}"
    if isinstance(image, torch.Tensor):
        return f"tensor of shape {tuple(image.shape)} and dtype {image.dtype}"
    if isinstance(image, Image.Image):
        return f"PIL image of mode {image.mode} and size {image.size}"
    if isinstance(image, (str, os.PathLike)):
        return os.fspath(image)
    if _is_dicom_dataset(image):
        return f"DICOM dataset {image.get('SOPInstanceUID', '(no SOPInstanceUID)')}"
    return f"object of type {type(image).__name__}"


def _is_dicom_dataset(obj: Any) -> bool:
    # pydicom is imported lazily: if nobody imported it, `obj` cannot be one of its Datasets.
    pydicom = sys.modules.get("pydicom")
    return pydicom is not None and isinstance(obj, pydicom.Dataset)


def _check_pixels(height: int, width: int, name: str, max_pixels: int | None) -> None:
    if max_pixels is not None and height * width > max_pixels:
        raise ImageTooLargeError(
            f"{name}: {width} x {height} pixels ({height * width / 1e6:.1f} megapixels) is more than "
            f"max_image_pixels={max_pixels}; downscale the image first or raise the image processor's max_image_pixels"
        )


def _min_max(values: np.ndarray, invert: bool = False) -> np.ndarray:
    """Stretch to float32 [0, 1] (`invert`: high values to 0); a constant image becomes zeros instead of dividing by
    zero. The difference is taken in the input's precision and stored as float32 (no full-size float64 temporary)."""
    low, high = float(values.min()), float(values.max())
    out = np.zeros(values.shape, dtype=np.float32)
    if high > low:
        if invert:
            np.subtract(high, values, out=out, casting="unsafe")
        else:
            np.subtract(values, low, out=out, casting="unsafe")
        out /= np.float32(high - low)
    return out


def _luma(colour: np.ndarray) -> np.ndarray:
    """(H, W, 3+) -> float32 (H, W) luma of the first three channels, one channel at a time."""
    grey = np.zeros(colour.shape[:2], dtype=np.float32)
    channel = np.empty_like(grey)
    for index, weight in enumerate(LUMA_WEIGHTS):
        np.multiply(colour[..., index], weight, out=channel, casting="unsafe")
        grey += channel
    return grey


def _alpha_to_unit(alpha: np.ndarray) -> np.ndarray:
    if alpha.dtype.kind == "f":
        return np.clip(alpha, 0.0, 1.0).astype(np.float32)
    return np.divide(alpha, np.iinfo(alpha.dtype).max, dtype=np.float32)


def _array_to_grey(array: np.ndarray, name: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """(H, W), (H, W, 1), (H, W, 3) RGB or (H, W, 4) RGBA array -> float32 (H, W) in [0, 1].

    uint8 is divided by 255 (its depth is known). Every other integer type is min-max stretched: a plain array does not
    say whether its uint16 values are 12-, 14- or 16-bit, and the image's own range is the only safe scale. Floats are
    min-max stretched too. Colour becomes luma; alpha is composited onto black, the colour of X-ray borders and of the
    padding.
    """
    if array.dtype.kind not in "uif":
        # bool is refused on purpose: a mask passed where an image belongs is more likely a bug than an image.
        raise ValueError(f"{name}: unsupported dtype {array.dtype}; expected an integer or floating-point image")
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4))):
        raise ValueError(f"{name}: expected a 2-D (H, W) image or (H, W, C) with C in 1, 3 (RGB) or 4 (RGBA)")
    if array.size == 0:
        raise ValueError(f"{name}: empty image")
    _check_pixels(array.shape[0], array.shape[1], name, max_pixels)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise ValueError(f"{name}: contains NaN or infinite values")

    values = _luma(array) if array.ndim == 3 else array  # (H, W)
    if array.dtype == np.uint8:
        grey = np.divide(values, 255.0, dtype=np.float32)
    else:
        grey = _min_max(values)
    if array.ndim == 3 and array.shape[-1] == 4:
        grey *= _alpha_to_unit(array[..., 3])
    return grey


def _pil_to_grey(image: Image.Image, name: str, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    _check_pixels(image.height, image.width, name, max_pixels)
    if image.mode == "1":
        image = image.convert("L")
    elif image.mode in _ALPHA_PIL_MODES:
        image = image.convert("RGBA")
    elif image.mode not in _DIRECT_PIL_MODES:  # CMYK, YCbCr, LAB, HSV, RGBX...
        image = image.convert("RGB")
    return _array_to_grey(np.asarray(image), name, max_pixels)


def _tensor_to_array(tensor: torch.Tensor, name: str) -> np.ndarray:
    """torch tensors follow torch's channels-first layout: (H, W) or (C, H, W) with C in 1, 3, 4."""
    tensor = tensor.detach().cpu()
    if tensor.dtype in (torch.bfloat16, torch.float16):
        tensor = tensor.float()  # numpy has no bfloat16
    if tensor.ndim == 3:
        if tensor.shape[0] not in (1, 3, 4):
            raise ValueError(f"{name}: a 3-D tensor must be channels-first (C, H, W) with C in 1, 3 or 4")
        tensor = tensor.permute(1, 2, 0)
    try:
        return tensor.numpy()
    except TypeError as err:  # complex and other dtypes numpy cannot take
        raise ValueError(f"{name}: unsupported dtype {tensor.dtype}") from err


def _looks_like_dicom(head: bytes) -> bool:
    return head[128:132] == b"DICM"


def _read_encoded(source: Path | bytes, name: str, suffix: str = "",
                  max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Decode a file or its bytes: DICOM by suffix or the 'DICM' magic, else PIL, else DICOM without a preamble."""
    if isinstance(source, Path):
        with open(source, "rb") as handle:
            head = handle.read(132)
    else:
        head = source[:132]

    def opened() -> Path | io.BytesIO:
        return source if isinstance(source, Path) else io.BytesIO(source)

    if _looks_like_dicom(head) or suffix.lower() in DICOM_SUFFIXES:
        return _read_dicom(opened(), name, force=not _looks_like_dicom(head), max_pixels=max_pixels)
    try:
        with warnings.catch_warnings():  # PIL's decompression-bomb warning: max_pixels is the limit that applies
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(opened())  # reads the header only
        with image:
            _check_pixels(image.height, image.width, name, max_pixels)
            image.load()
            image = ImageOps.exif_transpose(image)
    except ImageTooLargeError:
        raise
    except Image.DecompressionBombError as err:  # PIL's own limit, when max_image_pixels is raised above it
        raise ImageTooLargeError(f"{name}: {err}") from err
    except (OSError, SyntaxError, ValueError) as pil_error:
        try:  # some DICOM files lack the 128-byte preamble and the magic
            return _read_dicom(opened(), name, force=True, max_pixels=max_pixels)
        except ImageTooLargeError:
            raise
        except (ValueError, ImportError):  # ImportError: without pydicom, what PIL said is the answer
            raise ValueError(f"{name}: cannot read as an image ({pil_error}) nor as DICOM") from pil_error
    return _pil_to_grey(image, name, max_pixels)


def _import_pydicom():
    """pydicom and its LUT functions, imported on the first DICOM input only: the rest of the processor (and loading it
    with `trust_remote_code`, whose import check skips imports inside `try`) does not need pydicom."""
    try:
        import pydicom

        try:
            from pydicom.pixels import apply_modality_lut, apply_voi_lut
        except ImportError:  # pydicom 2.x
            from pydicom.pixel_data_handlers.util import apply_modality_lut, apply_voi_lut
    except ImportError as err:
        raise ImportError("reading DICOM images needs pydicom: pip install pydicom") from err
    return pydicom, apply_modality_lut, apply_voi_lut


def _read_dicom(dicom: Any, name: str, force: bool = False,
                max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    pydicom, apply_modality_lut, apply_voi_lut = _import_pydicom()

    if isinstance(dicom, pydicom.Dataset):
        dataset = dicom
    else:
        try:
            dataset = pydicom.dcmread(dicom, force=force)
        except Exception as err:  # pydicom raises many types (InvalidDicomError, EOFError, struct.error...)
            raise ValueError(f"{name}: cannot read DICOM ({err})") from err
    if "PixelData" not in dataset:
        raise ValueError(f"{name}: DICOM has no pixel data")
    if int(dataset.get("NumberOfFrames", 1) or 1) > 1:
        raise ValueError(f"{name}: multi-frame DICOM ({dataset.NumberOfFrames} frames) is not supported")
    _check_pixels(int(dataset.get("Rows", 0) or 0), int(dataset.get("Columns", 0) or 0), name, max_pixels)
    try:
        pixels = dataset.pixel_array
    except Exception as err:  # missing decoder plugin, truncated data, bad attributes...
        raise ValueError(f"{name}: cannot decode DICOM pixel data ({err})") from err

    if int(dataset.get("SamplesPerPixel", 1)) != 1:  # colour (pydicom already converted YBR to RGB)
        return _array_to_grey(pixels, name, max_pixels)
    # DICOM display pipeline in pydicom's float64, so no bit depth is lost: modality LUT (rescale) -> VOI (LUT or
    # window) -> presentation. MONOCHROME1 shows low values bright, so the single final min-max inverts it.
    # (A DX MONOCHROME1 image's Presentation LUT Shape "INVERSE" restates the same inversion; it is not applied twice.)
    values = apply_voi_lut(apply_modality_lut(pixels, dataset), dataset)
    return _min_max(values, invert=dataset.get("PhotometricInterpretation", "MONOCHROME2") == "MONOCHROME1")


def read_dicom(dicom: str | os.PathLike | bytes | Any, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS
               ) -> np.ndarray:
    """Read a DICOM file path, its bytes or a `pydicom.Dataset` into float32 (H, W) in [0, 1], bright = dense.

    Applies the Modality LUT / rescale slope and intercept, then the VOI LUT or window when present, inverts
    MONOCHROME1, and min-max normalises once at the end (a constant image gives zeros). Images of more than
    `max_pixels` pixels raise `ImageTooLargeError` before their pixel data is decoded.
    """
    if isinstance(dicom, (bytes, bytearray)):
        return _read_dicom(io.BytesIO(bytes(dicom)), "DICOM bytes", max_pixels=max_pixels)
    if isinstance(dicom, (str, os.PathLike)) and not os.path.isfile(dicom):
        raise ValueError(f"{os.fspath(dicom)}: no such file")
    return _read_dicom(dicom, _describe(dicom), max_pixels=max_pixels)


def load_image(image: ImageSource, max_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS) -> np.ndarray:
    """Load one image into float32 (H, W) in [0, 1] (chest X-rays are grey: colour becomes luma).

    Accepts PIL images (any mode), numpy arrays ((H, W), (H, W, 1|3|4); uint8, other integers, floats), torch tensors
    ((H, W) or (C, H, W)), file paths (PNG/JPEG/... through PIL with their full 16-bit depth, DICOM through pydicom),
    encoded bytes, `{"bytes": ..., "path": ...}` dicts (`datasets.Image(decode=False)`) and `pydicom.Dataset` objects.
    Raises `ValueError` naming the input when it cannot be read, and `ImageTooLargeError` (a `ValueError`) before
    decoding an image of more than `max_pixels` pixels (None: no limit).
    """
    name = _describe(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise ValueError(f"{name}: no such file")
        return _read_encoded(path, name, path.suffix, max_pixels)
    if isinstance(image, (bytes, bytearray)):
        return _read_encoded(bytes(image), "encoded image bytes", max_pixels=max_pixels)
    if isinstance(image, dict):
        if image.get("bytes") is not None:
            path = image.get("path") or ""
            return _read_encoded(bytes(image["bytes"]), path or "encoded image bytes", Path(path).suffix, max_pixels)
        if image.get("path"):
            return load_image(image["path"], max_pixels)
        raise ValueError(f"image dict with keys {sorted(image)}: expected a 'bytes' or a 'path' entry")
    if _is_dicom_dataset(image):
        return _read_dicom(image, name, max_pixels=max_pixels)
    if isinstance(image, Image.Image):
        return _pil_to_grey(image, name, max_pixels)
    if isinstance(image, torch.Tensor):
        if image.ndim in (2, 3):  # before a half-precision tensor is copied to float32
            _check_pixels(image.shape[-2], image.shape[-1], name, max_pixels)
        return _array_to_grey(_tensor_to_array(image, name), name, max_pixels)
    if isinstance(image, np.ndarray):
        return _array_to_grey(image, name, max_pixels)
    raise ValueError(f"{name}: unsupported image type; expected a PIL image, array, tensor, path or pydicom Dataset")


# --------------------------------------------------------------------------------------------------------------------
# Geometry: resize so the long side is `size`, pad to size x size; and the maps back.
# --------------------------------------------------------------------------------------------------------------------


def compute_content_box(
    original_size: tuple[int, int], size: int, pad_mode: str | PadMode = PadMode.CENTER
) -> tuple[int, int, int, int]:
    """(top, left, height, width) of an image of `original_size` (height, width) inside the padded square."""
    height, width = (int(v) for v in original_size)
    scale = size / max(height, width)
    new_height = max(1, min(size, int(height * scale + 0.5)))
    new_width = max(1, min(size, int(width * scale + 0.5)))
    if PadMode(pad_mode) is PadMode.CENTER:
        return (size - new_height) // 2, (size - new_width) // 2, new_height, new_width
    return 0, 0, new_height, new_width


def _resize(values: np.ndarray, height: int, width: int, resample: int = Image.Resampling.BILINEAR) -> np.ndarray:
    """Resize a float (H, W) map with PIL in mode "F" (32-bit float: no 8-bit rounding). PIL's bilinear widens its
    kernel when shrinking, so downsampling is antialiased."""
    image = Image.fromarray(np.ascontiguousarray(values, dtype=np.float32))
    return np.asarray(image.resize((width, height), resample=Image.Resampling(resample)), dtype=np.float32)


def _as_2d_map(heatmap: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(heatmap, torch.Tensor):
        heatmap = heatmap.detach().float().cpu().numpy()
    heatmap = np.asarray(heatmap, dtype=np.float32)
    if heatmap.ndim != 2 or heatmap.size == 0:
        raise ValueError(f"heatmap: expected a non-empty 2-D map, got shape {heatmap.shape}")
    return heatmap


def heatmap_to_original(
    heatmap: np.ndarray | torch.Tensor,
    original_size: tuple[int, int],
    content_box: tuple[int, int, int, int],
    fill_outside: float = float("nan"),
    input_size: int | None = None,
) -> np.ndarray:
    """Map a heat map over the model's square input (any resolution, e.g. a 7x7 patch grid) onto the original image.

    Upsamples to the square (bilinear), crops the content box (undoes the padding) and resizes to `original_size`
    (undoes the resize). Returns float32 (height, width). `input_size` (the square's side) defaults to the content
    box's long side, which is the side by construction. `fill_outside` fills parts of the content box that lie outside
    the square, which only happens for boxes that did not come from `compute_content_box`.
    """
    heatmap = _as_2d_map(heatmap)
    top, left, box_height, box_width = (int(v) for v in content_box)
    height, width = (int(v) for v in original_size)
    side = int(input_size) if input_size is not None else max(box_height, box_width)
    square = _resize(heatmap, side, side)

    content = np.full((box_height, box_width), fill_outside, dtype=np.float32)
    rows = slice(max(top, 0), min(top + box_height, side))
    cols = slice(max(left, 0), min(left + box_width, side))
    content[rows.start - top : rows.stop - top, cols.start - left : cols.stop - left] = square[rows, cols]
    return _resize(content, height, width)


def _scales(original_size: tuple[int, int], content_box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Per-coordinate (x, y, w, h) scale and offset from original pixels to processed pixels."""
    height, width = (float(v) for v in original_size)
    top, left, box_height, box_width = (float(v) for v in content_box)
    scale_x, scale_y = box_width / width, box_height / height
    return np.array([scale_x, scale_y, scale_x, scale_y]), np.array([left, top, 0.0, 0.0])


def _as_boxes(boxes: Any) -> np.ndarray:
    if isinstance(boxes, torch.Tensor):
        boxes = boxes.detach().cpu().numpy()
    boxes = np.asarray(boxes, dtype=np.float64)
    if boxes.ndim not in (1, 2) or boxes.shape[-1] != 4:
        raise ValueError(f"boxes_xywh: expected shape (4,) or (N, 4), got {boxes.shape}")
    return boxes


def boxes_to_processed(
    boxes_xywh: Any, original_size: tuple[int, int], content_box: tuple[int, int, int, int]
) -> np.ndarray:
    """(x, y, w, h) boxes in original pixels -> in the processed square's pixels; float64, same shape as given."""
    scale, offset = _scales(original_size, content_box)
    return _as_boxes(boxes_xywh) * scale + offset


def boxes_to_original(
    boxes_xywh: Any, original_size: tuple[int, int], content_box: tuple[int, int, int, int]
) -> np.ndarray:
    """Inverse of `boxes_to_processed`: (x, y, w, h) in the processed square -> in original pixels."""
    scale, offset = _scales(original_size, content_box)
    return (_as_boxes(boxes_xywh) - offset) / scale


# --------------------------------------------------------------------------------------------------------------------
# The processor
# --------------------------------------------------------------------------------------------------------------------


def _square_side(size: int | dict | Any) -> int:
    if isinstance(size, int):
        side = size
    elif isinstance(size, dict) and set(size) == {"longest_edge"}:
        side = size["longest_edge"]
    elif isinstance(size, dict) and set(size) == {"height", "width"} and size["height"] == size["width"]:
        side = size["height"]
    else:
        raise ValueError(f"size: expected an int or a square {{'height': s, 'width': s}}, got {size!r}")
    if not isinstance(side, int) or side < 1:
        raise ValueError(f"size: must be a positive int, got {side!r}")
    return side


def with_class_auto_map(processor: Any, serialised: dict[str, Any]) -> dict[str, Any]:
    """A processor's `to_dict` with the remote-code `auto_map` entry of its class's Auto registration.

    `save_pretrained` leaves an `auto_map` on the instance that `from_pretrained` drops, so a processor and its reloaded
    copy would serialise differently; derived from the class, the entry is the same on both and written by every save.
    """
    serialised.pop("auto_map", None)
    if processor._auto_class is not None:
        cls = type(processor)
        serialised["auto_map"] = {processor._auto_class: f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"}
    return serialised


def _flatten(images: list | tuple) -> list:
    """A list of images, or of lists of images (one per sample, possibly empty), as one flat list in order."""
    flat = []
    for item in images:
        flat.extend(_flatten(item) if isinstance(item, (list, tuple)) else [item])
    return flat


def _per_channel(values: float | list[float], num_channels: int, field: str) -> np.ndarray:
    values = np.atleast_1d(np.asarray(values, dtype=np.float32))
    if values.ndim != 1 or values.shape[0] not in (1, num_channels):
        raise ValueError(f"{field}: expected 1 or num_channels={num_channels} values, got {values.tolist()}")
    if field == "image_std" and (values <= 0).any():
        raise ValueError(f"image_std: must be positive, got {values.tolist()}")
    return np.broadcast_to(values, (num_channels,)).reshape(num_channels, 1, 1)


class PlanImageProcessor(BaseImageProcessor):
    r"""Chest-X-ray image processor.

    Every input becomes grey float in [0, 1] (see `load_image`: 16-bit depth kept, DICOM rescale/VOI applied,
    MONOCHROME1 inverted), is resized with its aspect ratio kept so its long side is `size` (bilinear, antialiased),
    padded to `size` x `size` with black (0), replicated to `num_channels` and normalised with `image_mean`/`image_std`.

    Args:
        size (`int` or `dict`, defaults to 224): side of the square input; stored as `{"height": s, "width": s}`.
        pad_mode (`str`, defaults to `"center"`): `"center"` or `"bottom_right"` (image in the top-left corner).
        resample (`int`, defaults to bilinear): a `PIL.Image.Resampling` filter for the image resize.
        do_normalize (`bool`, defaults to `True`): apply `(x - image_mean) / image_std`.
        image_mean, image_std (`float` or list, defaults to 0.5 and 0.5): one grey value (replicated) or one per
            channel. 0.5/0.5 maps [0, 1] to [-1, 1] (the ViT/CLIP-style convention used by GLoRIA/MGCA-style CXR
            models); pass ImageNet's values for a tower pre-trained with them.
        num_channels (`int`, defaults to 3): the grey image is replicated so ImageNet-style towers accept it.
        return_geometry (`bool`, defaults to `True`): also return `original_sizes` (B, 2) as (height, width) and
            `content_boxes` (B, 4) as (top, left, height, width), what `heatmap_to_original` and the box maps need.
        max_image_pixels (`int`, defaults to 100 million): larger inputs raise `ImageTooLargeError` before they are
            decoded; None lifts the limit.

    `images` may be one image, a list, or a nested list (one list per sample, as multimodal processors take them).
    """

    model_input_names = ["pixel_values", "original_sizes", "content_boxes"]
    valid_kwargs = PlanImageProcessorKwargs

    def __init__(
        self,
        size: int | dict[str, int] = 224,
        pad_mode: str = PadMode.CENTER.value,
        resample: int = Image.Resampling.BILINEAR,
        do_normalize: bool = True,
        image_mean: float | list[float] = 0.5,
        image_std: float | list[float] = 0.5,
        num_channels: int = 3,
        return_geometry: bool = True,
        max_image_pixels: int | None = DEFAULT_MAX_IMAGE_PIXELS,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        side = _square_side(size)
        self.size = {"height": side, "width": side}
        self.pad_mode = self._check_pad_mode(pad_mode)
        self.resample = int(Image.Resampling(resample))
        self.do_normalize = bool(do_normalize)
        self.num_channels = self._check_num_channels(num_channels)
        # Stored as lists of num_channels values, as other image processors' configs have them.
        self.image_mean = _per_channel(image_mean, self.num_channels, "image_mean").ravel().tolist()
        self.image_std = _per_channel(image_std, self.num_channels, "image_std").ravel().tolist()
        self.return_geometry = bool(return_geometry)
        self.max_image_pixels = self._check_max_image_pixels(max_image_pixels)

    @staticmethod
    def _check_pad_mode(pad_mode: str | PadMode) -> str:
        try:
            return PadMode(pad_mode).value
        except ValueError:
            raise ValueError(f"pad_mode: expected one of {[m.value for m in PadMode]}, got {pad_mode!r}") from None

    @staticmethod
    def _check_num_channels(num_channels: int) -> int:
        if not isinstance(num_channels, int) or num_channels < 1:
            raise ValueError(f"num_channels: must be a positive int, got {num_channels!r}")
        return num_channels

    @staticmethod
    def _check_max_image_pixels(max_image_pixels: int | None) -> int | None:
        if max_image_pixels is not None and (not isinstance(max_image_pixels, int) or max_image_pixels < 1):
            raise ValueError(f"max_image_pixels: must be a positive int or None, got {max_image_pixels!r}")
        return max_image_pixels

    def preprocess(
        self,
        images: ImageSource | list[ImageSource],
        size: int | dict[str, int] | None = None,
        pad_mode: str | None = None,
        resample: int | None = None,
        do_normalize: bool | None = None,
        image_mean: float | list[float] | None = None,
        image_std: float | list[float] | None = None,
        num_channels: int | None = None,
        return_geometry: bool | None = None,
        max_image_pixels: int | None = None,
        return_tensors: str | None = None,
        **kwargs: Any,
    ) -> BatchFeature:
        """Process one image, a list of them or a nested list (flattened in order). Returns `pixel_values`
        (B, C, size, size) float32 and, when `return_geometry`, `original_sizes` (B, 2) and `content_boxes` (B, 4) as
        int64. `return_tensors`: "pt", "np", or None (lists of per-image numpy arrays)."""
        unused = sorted(key for key, value in kwargs.items() if value is not None)
        if unused:
            logger.warning_once(f"PlanImageProcessor ignores the arguments {unused}")
        side = _square_side(self.size if size is None else size)
        pad_mode = self._check_pad_mode(self.pad_mode if pad_mode is None else pad_mode)
        resample = self.resample if resample is None else resample
        do_normalize = self.do_normalize if do_normalize is None else do_normalize
        num_channels = self._check_num_channels(self.num_channels if num_channels is None else num_channels)
        mean = _per_channel(self.image_mean if image_mean is None else image_mean, num_channels, "image_mean")
        std = _per_channel(self.image_std if image_std is None else image_std, num_channels, "image_std")
        return_geometry = self.return_geometry if return_geometry is None else return_geometry
        max_pixels = self._check_max_image_pixels(
            self.max_image_pixels if max_image_pixels is None else max_image_pixels)

        is_batch = isinstance(images, (list, tuple))
        images = _flatten(images) if is_batch else [images]
        if not images:
            raise ValueError("images: empty list, expected at least one image")

        pixel_values, original_sizes, content_boxes = [], [], []
        for index, image in enumerate(images):
            try:
                grey = load_image(image, max_pixels)
            except ValueError as err:
                if not is_batch:
                    raise
                error = ImageTooLargeError if isinstance(err, ImageTooLargeError) else ValueError
                raise error(f"image at index {index} of the batch: {err}") from err
            top, left, height, width = compute_content_box(grey.shape, side, pad_mode)
            canvas = np.zeros((side, side), dtype=np.float32)  # 0 = black, like the borders of an X-ray
            # Filters with negative lobes (bicubic, Lanczos) can overshoot [0, 1].
            canvas[top : top + height, left : left + width] = np.clip(_resize(grey, height, width, resample), 0, 1)
            channels = np.broadcast_to(canvas, (num_channels, side, side))  # (C, S, S)
            if do_normalize:
                channels = (channels - mean) / std
            pixel_values.append(np.ascontiguousarray(channels, dtype=np.float32))
            original_sizes.append(np.array(grey.shape, dtype=np.int64))
            content_boxes.append(np.array([top, left, height, width], dtype=np.int64))

        data: dict[str, Any] = {"pixel_values": pixel_values}
        if return_geometry:
            data.update(original_sizes=original_sizes, content_boxes=content_boxes)
        if return_tensors is not None:
            data = {key: np.stack(value) for key, value in data.items()}
        return BatchFeature(data=data, tensor_type=return_tensors)

    def to_dict(self) -> dict[str, Any]:
        return with_class_auto_map(self, super().to_dict())

    def heatmap_to_original(
        self,
        heatmap: np.ndarray | torch.Tensor,
        original_size: tuple[int, int],
        content_box: tuple[int, int, int, int],
        fill_outside: float = float("nan"),
    ) -> np.ndarray:
        """`heatmap_to_original` with this processor's square side."""
        return heatmap_to_original(heatmap, original_size, content_box, fill_outside, input_size=self.size["height"])

    boxes_to_processed = staticmethod(boxes_to_processed)
    boxes_to_original = staticmethod(boxes_to_original)
    compute_content_box = staticmethod(compute_content_box)
    load_image = staticmethod(load_image)


__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "ImageTooLargeError",
    "PadMode",
    "PlanImageProcessor",
    "boxes_to_original",
    "boxes_to_processed",
    "compute_content_box",
    "heatmap_to_original",
    "load_image",
    "read_dicom",
]

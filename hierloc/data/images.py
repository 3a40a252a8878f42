"""Image loading and preprocessing with Pillow + numpy/torch (never torchvision or timm).

Two concerns:

* `load_image(path)`: any file Pillow can read -> an RGB `PIL.Image`, upright (EXIF orientation applied), or an
  `InputError` with a one-line message naming the file and the reason. The file is only ever opened for reading.
* `Preprocessor`: RGB images -> uint8 pixels (3, S, S) (`pixels_one`, what datasets return) and their normalised
  float32 form with the backbone's own statistics (`normalise`, applied on the device by the image encoder;
  `preprocess_one`/`__call__` give it directly). Evaluation: resize the shorter side to `resize_size`, centre-crop
  `image_size`. Training: a small random-resized crop and mild brightness/contrast jitter, deterministic given a
  `torch.Generator` (rounded to uint8 in `pixels_one`).

Why there is no horizontal flip (the usual ImageNet augmentation): a mirrored street photo drives on the other
side of the road, reads its signs backwards and has the sun on the wrong side for its hemisphere. These are some of
the strongest geolocation cues, so a flip creates training images of places that do not exist.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from hierloc.data import shards
from hierloc.data.encoded import EncodedImage
from hierloc.data.formats import enable_extra_formats
from hierloc.errors import InputError

logger = logging.getLogger(__name__)

# Normalisation statistics of the common backbone families (per RGB channel, on [0, 1] pixel values).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# OpenAI CLIP's training statistics (the values in every CLIP preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# SigLIP maps pixels to [-1, 1].
HALF_MEAN = (0.5, 0.5, 0.5)
HALF_STD = (0.5, 0.5, 0.5)

# model_type (transformers config) -> (mean, std, resize_size / image_size ratio) when no preprocessor_config.json.
# ViT/DINO follow the ImageNet evaluation convention (resize 256, crop 224); CLIP and SigLIP resize straight to the
# crop size (CLIP: shorter side 224 then centre crop 224; SigLIP squashes to 224x224, centre crop is our
# approximation that keeps the aspect ratio).
_FAMILY_DEFAULTS: dict[str, tuple[tuple[float, ...], tuple[float, ...], float]] = {
    "vit": (IMAGENET_MEAN, IMAGENET_STD, 256 / 224),
    "dinov2": (IMAGENET_MEAN, IMAGENET_STD, 256 / 224),
    "dinov2_with_registers": (IMAGENET_MEAN, IMAGENET_STD, 256 / 224),
    "dinov3_vit": (IMAGENET_MEAN, IMAGENET_STD, 256 / 224),
    "clip": (CLIP_MEAN, CLIP_STD, 1.0),
    "clip_vision_model": (CLIP_MEAN, CLIP_STD, 1.0),
    "siglip": (HALF_MEAN, HALF_STD, 1.0),
    "siglip_vision_model": (HALF_MEAN, HALF_STD, 1.0),
    "siglip2": (HALF_MEAN, HALF_STD, 1.0),
    "siglip2_vision_model": (HALF_MEAN, HALF_STD, 1.0),
}

PREPROCESSOR_CONFIG_NAME = "preprocessor_config.json"

# Training augmentation ranges (see module docstring for the missing flip).
TRAIN_CROP_SCALE = (0.7, 1.0)  # fraction of the image area kept by the random-resized crop
TRAIN_CROP_RATIO = (3 / 4, 4 / 3)  # aspect ratio range of the crop
TRAIN_BRIGHTNESS = 0.2  # multiply pixels by a factor in [1 - 0.2, 1 + 0.2]
TRAIN_CONTRAST = 0.2  # scale deviations from the mean grey level by a factor in [0.8, 1.2]


# --------------------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------------------


def load_image(path: str | os.PathLike | EncodedImage, min_side: int | None = None) -> Image.Image:
    """Read an image file (or an `EncodedImage`) as an upright RGB `PIL.Image` (fully loaded, file closed).

    - EXIF orientation is applied (`ImageOps.exif_transpose`), so phone photos are upright (a malformed EXIF
      block is logged and the stored orientation kept).
    - Colour modes: L/1/P/CMYK/YCbCr -> RGB with Pillow's conversion; 16-bit (`I;16*`, `I`) is scaled to 8 bits
      (`value / 257`) instead of Pillow's clipping at 255; float (`F`) is read as [0, 1] when its maximum is
      <= 1, else as [0, 255]. Transparency (RGBA, LA, P with a transparent colour) is composited on WHITE: dropping
      alpha would expose whatever colour the encoder stored under fully transparent pixels (often black or
      garbage), while white is what a viewer shows on a page.
    - Multi-frame files (GIF, TIFF) give their first frame.
    - `min_side`: when given, a JPEG may be decoded at a reduced scale (`Image.draft`, 1/2, 1/4 or 1/8) as long as
      its shorter side stays >= `min_side`: faster decoding of large photos that are downsized anyway (a 640x480
      photo for a 64 px input: 10.5 -> 6.2 ms decode, 3.5 -> 1.2 ms resize on the 2-core reference machine).

    Raises `InputError` (one line, naming the file) for: missing path, a directory, an empty file, a file that is
    not an image, truncated/corrupt data, and decompression bombs (Pillow's `MAX_IMAGE_PIXELS` limit; the warning
    Pillow issues between 1x and 2x the limit is treated as an error too). Truncated images are never accepted:
    this function does not rely on (or set) `ImageFile.LOAD_TRUNCATED_IMAGES`.
    """
    if isinstance(path, EncodedImage):
        if not path.data:
            raise InputError(f"{path.name}: empty file (0 bytes), expected an image")
        return decode_image(io.BytesIO(path.data), path.name, min_side)
    path_str = os.fspath(path)
    with _open_image_file(path_str) as handle:
        return decode_image(handle, path_str, min_side)


def decode_image(handle: BinaryIO, name: str, min_side: int | None = None) -> Image.Image:
    """An open binary stream of an image file -> upright RGB `PIL.Image`, with the guards and rules of
    `load_image` (errors are one-line `InputError`s starting with `name`). The stream is read, never written."""
    enable_extra_formats()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(handle)
            if min_side is not None and image.format == "JPEG":
                _draft_jpeg(image, min_side)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise InputError(f"{name}: {_too_large(error)}") from None
    except UnidentifiedImageError:
        raise InputError(f"{name}: not a recognised image file") from None
    except (OSError, SyntaxError, ValueError, EOFError) as error:
        # Pillow reports truncated/corrupt data as OSError ("image file is truncated"), SyntaxError or EOFError.
        raise InputError(f"{name}: truncated or corrupt image data ({_one_line(error)})") from None
    try:
        image = ImageOps.exif_transpose(image)
    except Exception as error:  # noqa: BLE001 - malformed EXIF must not make a readable image unusable
        logger.warning("%s: cannot apply the EXIF orientation (%s); using the stored orientation", name,
                       _one_line(error))
    try:
        return to_rgb(image)
    except ValueError as error:
        raise InputError(f"{name}: unsupported colour mode {image.mode!r} ({_one_line(error)})") from None


def _open_image_file(path_str: str):
    """A binary handle on the image `path_str` (a file, or a member of a zip shard: `hierloc.data.shards`);
    InputError (one line) for a missing path, a directory, an empty or unreadable file."""
    in_zip = shards.open_image_bytes(path_str)
    if in_zip is not None:
        if in_zip.getbuffer().nbytes == 0:
            raise InputError(f"{path_str}: empty file (0 bytes), expected an image")
        return in_zip
    if not os.path.exists(path_str):
        raise InputError(f"{path_str}: image file not found")
    if os.path.isdir(path_str):
        raise InputError(f"{path_str}: expected an image file, found a directory")
    try:
        size_bytes = os.path.getsize(path_str)
    except OSError as error:
        raise InputError(f"{path_str}: cannot read image file ({error.strerror or error})") from None
    if size_bytes == 0:
        raise InputError(f"{path_str}: empty file (0 bytes), expected an image")
    try:
        return open(path_str, "rb")
    except OSError as error:
        raise InputError(f"{path_str}: cannot open image file ({error.strerror or _one_line(error)})") from None


def _too_large(error: BaseException) -> str:
    """Pillow's decompression-bomb error/warning -> 'image too large: N pixels, more than the limit of M ...'.

    Pillow raises it from the header, before any pixel is decoded; its text carries the pixel count."""
    found = re.search(r"\((\d+) pixels\)", str(error))
    size = f"{int(found.group(1)):,} pixels" if found else _one_line(error)
    limit = Image.MAX_IMAGE_PIXELS
    limit_text = f"{limit:,} pixels" if limit else "Pillow's limit"
    return (f"image too large: {size}, more than the limit of {limit_text} (decompression bomb guard: not "
            "decoded); expected a photo of a reasonable size")


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text if text else type(error).__name__


def _draft_jpeg(image: Image.Image, min_side: int) -> None:
    """Ask the JPEG decoder for the smallest DCT scale whose shorter side is still >= `min_side`."""
    width, height = image.size
    scale = max(1.0, min(width, height) / max(1, int(min_side)))
    if scale >= 2:
        # draft() picks the largest reduction that keeps the size >= the requested size.
        image.draft(image.mode, (int(np.ceil(width / scale)), int(np.ceil(height / scale))))


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert a Pillow image of any mode to 8-bit RGB (see `load_image` for the rules per mode)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode.startswith("I;16") or mode == "I":
        values = np.asarray(image, dtype=np.float64)
        if mode == "I" and values.size and values.max() <= 255:
            grey = values
        else:
            grey = values / 257.0  # 65535 -> 255
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        finite_max = np.nanmax(values) if values.size else 0.0
        scale = 255.0 if finite_max <= 1.0 else 1.0
        grey = np.nan_to_num(values * scale, nan=0.0)
        return Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in image.info)
    if has_alpha:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB `PIL.Image` (W x H) -> float32 tensor (3, H, W) with values in [0, 1] (pixel / 255)."""
    array = np.asarray(to_rgb(image), dtype=np.uint8)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).to(torch.float32).div_(255.0)


# --------------------------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Preprocessor:
    """Images -> normalised pixel tensors for one backbone.

    image_size: side S of the square crop the backbone sees.
    resize_size: the shorter side is resized to this before the eval centre crop (>= image_size).
    mean, std: per-channel statistics on [0, 1] pixels; output = (pixel - mean) / std.
    """

    image_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    resize_size: int | None = None

    def __post_init__(self) -> None:
        if int(self.image_size) <= 0:
            raise InputError(f"preprocessor: image_size must be a positive integer, got {self.image_size!r}")
        object.__setattr__(self, "image_size", int(self.image_size))
        resize = self.image_size if self.resize_size is None else int(self.resize_size)
        object.__setattr__(self, "resize_size", max(resize, self.image_size))
        for name in ("mean", "std"):
            values = tuple(float(v) for v in getattr(self, name))
            if len(values) != 3:
                raise InputError(f"preprocessor: {name} must have 3 values (R, G, B), got {values!r}")
            object.__setattr__(self, name, values)
        if min(self.std) <= 0:
            raise InputError(f"preprocessor: std values must be > 0, got {self.std!r}")

    # -- construction -----------------------------------------------------------------------------------------

    @classmethod
    def for_model_type(cls, model_type: str | None, image_size: int) -> "Preprocessor":
        """Defaults for a transformers `model_type` (ImageNet stats for ViT/DINO and unknown types)."""
        mean, std, ratio = _FAMILY_DEFAULTS.get(model_type or "", (IMAGENET_MEAN, IMAGENET_STD, 256 / 224))
        return cls(image_size=image_size, mean=mean, std=std, resize_size=int(round(image_size * ratio)))

    @classmethod
    def from_backbone_dir_or_config(
        cls, directory: str | os.PathLike | None = None, config: Any = None
    ) -> "Preprocessor":
        """Read `<directory>/preprocessor_config.json` if present, else use defaults for `config.model_type`.

        config: a transformers `PretrainedConfig` (or None); its `image_size` is the fallback crop size.
        JSON keys used: `image_mean`, `image_std`, `size` (int, {"shortest_edge": n} or {"height", "width"}),
        `crop_size` (int or {"height", "width"}), `do_center_crop`. Missing keys fall back to the defaults.
        """
        model_type = getattr(config, "model_type", None)
        config_size = _config_image_size(config)
        json_path = Path(directory) / PREPROCESSOR_CONFIG_NAME if directory is not None else None
        if json_path is None or not json_path.is_file():
            if config_size is None:
                raise InputError(
                    f"{directory}: cannot tell the input image size (no {PREPROCESSOR_CONFIG_NAME} and no "
                    "image_size in config.json)"
                )
            return cls.for_model_type(model_type, config_size)
        try:
            data = json.loads(json_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise InputError(f"{json_path}: cannot read preprocessor config ({_one_line(error)})") from None
        if not isinstance(data, dict):
            raise InputError(f"{json_path}: expected a JSON object")
        resize_side = _side_from_size(data.get("size"), json_path, "size")
        crop_side = _side_from_size(data.get("crop_size"), json_path, "crop_size")
        if data.get("do_center_crop") is False:
            crop_side = None
        image_size = crop_side or resize_side or config_size
        if image_size is None:
            raise InputError(f"{json_path}: no size/crop_size and the backbone config has no image_size")
        defaults = cls.for_model_type(model_type, image_size)
        mean = _triple(data.get("image_mean", defaults.mean), json_path, "image_mean")
        std = _triple(data.get("image_std", defaults.std), json_path, "image_std")
        if resize_side is None:
            resize_side = defaults.resize_size
        return cls(image_size=image_size, mean=mean, std=std, resize_size=resize_side)

    def to_json_dict(self) -> dict[str, Any]:
        """A `preprocessor_config.json` compatible with transformers image processors and with this class."""
        return {
            "image_mean": list(self.mean),
            "image_std": list(self.std),
            "size": {"shortest_edge": self.resize_size},
            "crop_size": {"height": self.image_size, "width": self.image_size},
            "do_center_crop": True,
            "do_normalize": True,
            "do_resize": True,
        }

    def describe(self) -> dict[str, Any]:
        """Everything that determines the eval output (used in feature-cache identities)."""
        return {
            "image_size": self.image_size,
            "resize_size": self.resize_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "resample": "bicubic",
            "crop": "center",
        }

    # -- application ------------------------------------------------------------------------------------------

    def decode_min_side(self, train: bool = False) -> int:
        """Smallest shorter side a JPEG may be decoded at without losing detail in the output: resize_size for
        eval; resize_size / min crop scale for training (the random crop may keep only 70% of the area)."""
        if not train:
            return self.resize_size
        return int(np.ceil(self.resize_size / TRAIN_CROP_SCALE[0]))

    def load(self, path: str | os.PathLike | EncodedImage, train: bool = False) -> Image.Image:
        """`load_image` with JPEG draft decoding at `decode_min_side(train)`: faster on photos much larger
        than the input size. Use it for every file that feeds this preprocessor (training, feature extraction,
        prediction), so that the same file gives the same pixels on every path."""
        return load_image(path, min_side=self.decode_min_side(train))

    def __call__(
        self, images: Sequence[Image.Image], train: bool = False, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """RGB images (any sizes) -> float32 tensor (B, 3, S, S), S = image_size, normalised.

        train=False: shorter side -> resize_size (bicubic), centre crop S x S.
        train=True: random-resized crop (area fraction in TRAIN_CROP_SCALE, aspect in TRAIN_CROP_RATIO) resized to
        S x S, then brightness and contrast jitter; random numbers come from `generator` (torch's global RNG when
        None), so a seeded generator gives identical outputs.
        """
        if isinstance(images, Image.Image):
            images = [images]
        tensors = [self.preprocess_one(image, train=train, generator=generator) for image in images]
        if not tensors:
            return torch.empty((0, 3, self.image_size, self.image_size), dtype=torch.float32)
        return torch.stack(tensors)

    def preprocess_one(
        self, image: Image.Image, train: bool = False, generator: torch.Generator | None = None,
        shift_frac: float = 0.0,
    ) -> torch.Tensor:
        """One RGB image -> normalised float32 tensor (3, S, S): `normalise(pixels_one(...))`; see `__call__`."""
        return self.normalise(self.pixels_one(image, train=train, generator=generator, shift_frac=shift_frac))

    def pixels_one(
        self, image: Image.Image, train: bool = False, generator: torch.Generator | None = None,
        shift_frac: float = 0.0,
    ) -> torch.Tensor:
        """One RGB image -> uint8 tensor (3, S, S), not normalised: what datasets return (4x less memory through
        the DataLoader's shared memory and the host->device copy than float32); `normalise` (the image encoder
        calls it, on the device) gives the float32 input. Eval: the resized centre crop's pixels as they are, so
        normalise(pixels_one(x)) equals the float path bit for bit. Training: the random-resized crop, the shift
        (``shift_frac``: translate by up to that fraction of the side, see `_shift`) and the brightness/contrast
        jitter are computed on [0, 1] floats, then rounded to the nearest of the 256 levels: at most half a
        quantum (0.5/255 before normalisation) from the float result."""
        image = to_rgb(image)
        if not train:
            array = np.asarray(self._resize_center_crop(image), dtype=np.uint8)
            return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()
        pixels = to_tensor(self._random_resized_crop(image, generator))
        if shift_frac > 0:
            pixels = self._shift(pixels, shift_frac, generator)
        pixels = self._jitter(pixels, generator)
        return pixels.mul(255.0).round_().clamp_(0, 255).to(torch.uint8)

    def normalise(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 pixels (..., 3, H, W) -> float32 (pixel / 255 - mean) / std (`normalise_pixels` with this
        preprocessor's statistics)."""
        mean, std = self.statistics()
        return normalise_pixels(pixels, mean.to(pixels.device), std.to(pixels.device))

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) as float32 tensors (3, 1, 1), for `normalise_pixels`."""
        return (torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1),
                torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1))

    def _resize_center_crop(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        scale = self.resize_size / min(width, height)
        new_width = max(self.image_size, int(round(width * scale)))
        new_height = max(self.image_size, int(round(height * scale)))
        left = (new_width - self.image_size) / 2
        top = (new_height - self.image_size) / 2
        # One resample straight from the source region to the crop (PIL's `box`), same result as resize-then-crop.
        box = (left / scale, top / scale, (left + self.image_size) / scale, (top + self.image_size) / scale)
        return image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, box=box,
                            reducing_gap=3.0)

    def _random_resized_crop(self, image: Image.Image, generator: torch.Generator | None) -> Image.Image:
        width, height = image.size
        area = width * height
        uniform = torch.rand(4, generator=generator, dtype=torch.float64).tolist()
        scale = TRAIN_CROP_SCALE[0] + (TRAIN_CROP_SCALE[1] - TRAIN_CROP_SCALE[0]) * uniform[0]
        log_low, log_high = np.log(TRAIN_CROP_RATIO[0]), np.log(TRAIN_CROP_RATIO[1])
        ratio = float(np.exp(log_low + (log_high - log_low) * uniform[1]))
        crop_width = min(width, np.sqrt(area * scale * ratio))
        crop_height = min(height, np.sqrt(area * scale / ratio))
        left = (width - crop_width) * uniform[2]
        top = (height - crop_height) * uniform[3]
        box = (left, top, left + crop_width, top + crop_height)
        return image.resize((self.image_size, self.image_size), Image.Resampling.BICUBIC, box=box,
                            reducing_gap=3.0)

    @staticmethod
    def _shift(pixels: torch.Tensor, shift_frac: float, generator: torch.Generator | None) -> torch.Tensor:
        """pixels (3, S, S) -> the same size moved by (dx, dy), each uniform in [-s, s] pixels, s = round(shift_frac
        * S), the uncovered border filled by reflection. Teaches the encoder that a place seen a little off-centre
        is the same place (a held-out photo is never framed like a training one)."""
        size = pixels.shape[-1]
        s = min(int(round(shift_frac * size)), size - 1)
        if s <= 0:
            return pixels
        dx, dy = torch.randint(0, 2 * s + 1, (2,), generator=generator).tolist()
        padded = torch.nn.functional.pad(pixels.unsqueeze(0), (s, s, s, s), mode="reflect")[0]
        return padded[:, dy:dy + pixels.shape[-2], dx:dx + size].contiguous()

    @staticmethod
    def _jitter(pixels: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """pixels (3, H, W) in [0, 1] -> brightness b*x, then contrast c*(x - m) + m (m = mean grey), clamped."""
        uniform = torch.rand(2, generator=generator, dtype=torch.float64).tolist()
        brightness = 1.0 + TRAIN_BRIGHTNESS * (2.0 * uniform[0] - 1.0)
        contrast = 1.0 + TRAIN_CONTRAST * (2.0 * uniform[1] - 1.0)
        pixels = (pixels * brightness).clamp_(0.0, 1.0)
        grey = (0.299 * pixels[0] + 0.587 * pixels[1] + 0.114 * pixels[2]).mean()
        return ((pixels - grey) * contrast + grey).clamp_(0.0, 1.0)


def normalise_pixels(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 pixels (..., 3, H, W) -> float32 (pixel / 255 - mean) / std, on the pixels' device; mean, std float32
    (3, 1, 1). The one normalisation of the project (the same float32 operations as `to_tensor` followed by the
    subtraction and division, hence bit-identical to normalising on the CPU before the copy)."""
    return (pixels.to(torch.float32).div_(255.0) - mean) / std


def _config_image_size(config: Any) -> int | None:
    size = getattr(config, "image_size", None)
    if isinstance(size, (list, tuple)):
        size = size[0] if size else None
    return int(size) if isinstance(size, (int, np.integer)) and size > 0 else None


def _side_from_size(value: Any, path: Path, key: str) -> int | None:
    """transformers `size`/`crop_size` (int, {"shortest_edge"}, {"height","width"}) -> one side in pixels."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise InputError(f"{path}: {key} must be an integer or an object with height/width, got {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        if "shortest_edge" in value:
            return int(value["shortest_edge"])
        if "height" in value and "width" in value:
            if int(value["height"]) != int(value["width"]):
                logger.warning("%s: non-square %s %s; using the smaller side", path, key, value)
            return min(int(value["height"]), int(value["width"]))
    raise InputError(f"{path}: {key} must be an integer or an object with shortest_edge or height/width, "
                     f"got {value!r}")


def _triple(value: Any, path: Path, key: str) -> tuple[float, float, float]:
    if isinstance(value, (int, float)):
        value = [value] * 3
    try:
        values = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3:
        raise InputError(f"{path}: {key} must be a number or a list of 3 numbers, got {value!r}")
    return values  # type: ignore[return-value]

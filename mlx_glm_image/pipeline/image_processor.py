"""diffusers' VaeImageProcessor for the VAE's edges: PIL / numpy images <-> NCHW MLX arrays in [-1, 1]."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
from PIL import Image

# Pillow modes that convert to RGB meaningfully (16-bit / float single-channel modes do not).
_CONVERTIBLE_MODES = {
    "1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV", "I",
}

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


class VaeImageProcessor:
    """The subset of diffusers' VaeImageProcessor the GLM-Image pipeline uses (plus RGB conversion).

    preprocess: PIL images are resized with Lanczos to (height, width) snapped down to multiples of
    ``vae_scale_factor``, then converted to RGB; numpy images (HWC / NHWC floats in [0, 1], or uint8) are resized with
    torch's 'nearest' rule as diffusers does; the result is NCHW float32 in [-1, 1].
    postprocess: NCHW in [-1, 1] -> [0, 1] -> PIL images (uint8, rounded) or NHWC numpy.
    """

    def __init__(self, vae_scale_factor: int = 8, resample: str = "lanczos", do_resize: bool = True,
                 do_normalize: bool = True, do_convert_rgb: bool = True):
        if resample not in _RESAMPLE:
            raise ValueError(f"resample must be one of {', '.join(_RESAMPLE)}, got {resample!r}")
        if vae_scale_factor < 1:
            raise ValueError(f"vae_scale_factor must be >= 1, got {vae_scale_factor}")
        self.vae_scale_factor = vae_scale_factor
        self.resample = resample
        self.do_resize = do_resize
        self.do_normalize = do_normalize
        self.do_convert_rgb = do_convert_rgb

    # -- sizes ------------------------------------------------------------------------------------------

    def get_default_height_width(self, image, height: int | None = None, width: int | None = None):
        """(height, width) of the image unless given, snapped down to multiples of vae_scale_factor."""
        if height is None:
            height = image.height if isinstance(image, Image.Image) else image.shape[1]
        if width is None:
            width = image.width if isinstance(image, Image.Image) else image.shape[2]
        f = self.vae_scale_factor
        height, width = int(height) - int(height) % f, int(width) - int(width) % f
        if height < f or width < f:
            raise ValueError(
                f"image size {height}x{width} after snapping to multiples of {f} is empty; "
                f"the image (or the asked size) must be at least {f}x{f} pixels"
            )
        return height, width

    # -- preprocess ---------------------------------------------------------------------------------------

    def _pil_to_rgb(self, image: Image.Image) -> Image.Image:
        if image.mode == "RGB" or not self.do_convert_rgb:
            return image
        if image.mode not in _CONVERTIBLE_MODES:
            raise ValueError(f"unsupported image mode {image.mode!r}; convert it to RGB first")
        return image.convert("RGB")

    @staticmethod
    def _numpy_batch(images: list[np.ndarray]) -> np.ndarray:
        arrays = []
        for a in images:
            a = np.asarray(a)
            if a.dtype == np.uint8:
                a = a.astype(np.float32) / 255.0
            elif not np.issubdtype(a.dtype, np.floating):
                raise ValueError(f"numpy images must be float in [0, 1] or uint8, got dtype {a.dtype}")
            if a.ndim == 2:
                a = a[None, :, :, None]
            elif a.ndim == 3:
                a = a[None]
            elif a.ndim != 4:
                raise ValueError(f"numpy images must be HW, HWC or NHWC, got shape {a.shape}")
            arrays.append(a.astype(np.float32))
        shapes = {a.shape[1:] for a in arrays}
        if len(shapes) > 1:
            raise ValueError(f"numpy images in one batch must share a shape, got {sorted(shapes)}")
        batch = np.concatenate(arrays, axis=0)
        if batch.shape[-1] == 1:
            batch = np.repeat(batch, 3, axis=-1)  # grayscale -> RGB
        if batch.shape[-1] != 3:
            raise ValueError(f"numpy images must have 1 or 3 channels (HWC / NHWC), got shape {batch.shape}")
        return batch

    @staticmethod
    def _resize_nearest(batch: np.ndarray, height: int, width: int) -> np.ndarray:
        # torch.nn.functional.interpolate(mode="nearest") with size=: src = floor(dst * (in / out)) in float32
        n, h, w, c = batch.shape
        if (h, w) == (height, width):
            return batch
        ys = np.minimum(np.floor(np.arange(height, dtype=np.float32) * np.float32(h / height)).astype(np.int64), h - 1)
        xs = np.minimum(np.floor(np.arange(width, dtype=np.float32) * np.float32(w / width)).astype(np.int64), w - 1)
        return batch[:, ys][:, :, xs]

    def preprocess(self, image, height: int | None = None, width: int | None = None) -> mx.array:
        """PIL image / numpy array / list of either -> (B, 3, H, W) float32 MLX array in [-1, 1]."""
        images = image if isinstance(image, (list, tuple)) else [image]
        if len(images) == 0:
            raise ValueError("no image given")
        if all(isinstance(i, Image.Image) for i in images):
            for i in images:
                if self.do_convert_rgb and i.mode not in _CONVERTIBLE_MODES:
                    raise ValueError(f"unsupported image mode {i.mode!r}; convert it to RGB first")
            # diffusers' order: resize, then convert (a palette image resizes by nearest in its own mode)
            if self.do_resize:
                height, width = self.get_default_height_width(images[0], height, width)
                images = [
                    i.resize((width, height), resample=_RESAMPLE[self.resample]) if i.size != (width, height) else i
                    for i in images
                ]
            images = [self._pil_to_rgb(i) for i in images]
            sizes = {i.size for i in images}
            if len(sizes) > 1:
                raise ValueError(f"images in one batch must share a size, got {sorted(sizes)}")
            batch = np.stack([np.asarray(i).astype(np.float32) / 255.0 for i in images], axis=0)
            if batch.ndim == 3:  # single-channel image kept as is (do_convert_rgb=False)
                batch = batch[..., None]
        elif all(isinstance(i, np.ndarray) for i in images):
            batch = self._numpy_batch(list(images))
            if self.do_resize:
                height, width = self.get_default_height_width(batch, height, width)
                batch = self._resize_nearest(batch, height, width)
        else:
            kinds = sorted({type(i).__name__ for i in images})
            raise ValueError(f"images must be PIL images or numpy arrays (not mixed), got {', '.join(kinds)}")
        if batch.shape[-1] != 3:
            raise ValueError(f"expected 3 colour channels, got {batch.shape[-1]} (mode not converted to RGB)")
        if not self.do_resize:
            f = self.vae_scale_factor
            if batch.shape[1] % f or batch.shape[2] % f:
                raise ValueError(f"image size {batch.shape[1]}x{batch.shape[2]} is not a multiple of {f}")
        x = batch.transpose(0, 3, 1, 2)
        # diffusers skips the normalisation (with a warning) when the input is already in [-1, 1]
        if self.do_normalize and x.min() >= 0:
            x = 2.0 * x - 1.0
        return mx.array(np.ascontiguousarray(x, dtype=np.float32))

    # -- postprocess --------------------------------------------------------------------------------------

    def postprocess(self, image: mx.array, output_type: str = "pil"):
        """(B, 3, H, W) in [-1, 1] -> list of PIL images ("pil"), NHWC float numpy in [0, 1] ("np") or the
        denormalised NCHW MLX array ("mx")."""
        if output_type not in ("pil", "np", "mx"):
            raise ValueError(f"output_type must be 'pil', 'np' or 'mx', got {output_type!r}")
        if not isinstance(image, (mx.array, np.ndarray)):
            raise ValueError(f"postprocess takes an NCHW mlx (or numpy) array, got {type(image).__name__}")
        if image.ndim != 4 or image.shape[1] not in (1, 3):
            raise ValueError(f"postprocess takes (batch, 3, height, width) images, got shape {tuple(image.shape)}")
        x = mx.array(image) if isinstance(image, np.ndarray) else image
        x = x.astype(mx.float32)
        if self.do_normalize:
            x = mx.clip(x * 0.5 + 0.5, 0.0, 1.0)
        if output_type == "mx":
            return x
        arr = np.array(x.transpose(0, 2, 3, 1))
        if output_type == "np":
            return arr
        return numpy_to_pil(arr)


def numpy_to_pil(images: np.ndarray) -> list[Image.Image]:
    """NHWC / HWC floats in [0, 1] -> PIL images (diffusers' rounding)."""
    if images.ndim == 3:
        images = images[None]
    images = (images * 255).round().astype("uint8")
    if images.shape[-1] == 1:
        return [Image.fromarray(i.squeeze(), mode="L") for i in images]
    return [Image.fromarray(i) for i in images]


# ---------------------------------------------------------------------------------------------------------
# Condition images: any file a user has, as RGB, at a size both the VAE and the AR model's vision encoder take.


def image_size(image) -> tuple[int, int]:
    """(width, height) of a PIL image or an (H, W, C) array."""
    return image.size if hasattr(image, "width") else (image.shape[1], image.shape[0])


def to_rgb(image) -> Image.Image:
    """A PIL image (any mode: 16-bit, float, palette, CMYK, with alpha) or an HWC array as 8-bit RGB; transparent
    pixels over white."""
    if isinstance(image, np.ndarray):
        a = image.astype(np.float64) * 255 if np.issubdtype(image.dtype, np.floating) else image
        image = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8))
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        a = np.asarray(image, dtype=np.float64)
        scale = 1 / 257 if a.max() > 255 or image.mode.startswith("I;16") else 1.0
        if image.mode == "F" and a.max() <= 1.0:
            scale = 255.0
        image = Image.fromarray(np.clip(np.round(a * scale), 0, 255).astype(np.uint8), mode="L")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def load_image(path, name: str | None = None) -> Image.Image:
    """Open an image file (a path or a binary file object, called ``name`` in errors) as upright RGB (EXIF
    orientation applied); one-line errors, decompression bombs refused."""
    import warnings

    from PIL import ImageOps, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                return to_rgb(ImageOps.exif_transpose(im))
    except FileNotFoundError:
        raise ValueError(f"condition image {name or path} does not exist") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ValueError(f"condition image {name or path} has more than {Image.MAX_IMAGE_PIXELS} pixels; "
                         "refused as a possible decompression bomb") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"cannot read condition image {name or path}: {str(e).split(' <_io')[0]}") from None


def fit_condition_image(image: Image.Image, multiple: int, min_pixels: int, max_pixels: int) -> Image.Image:
    """Resize once (Lanczos) to a size that is a multiple of ``multiple`` per side and within the AR image
    processor's bounds (sqrt(min_pixels) to sqrt(max_pixels) per side, its smart_resize rule), so that the VAE and
    the vision encoder see the same image and their token grids agree."""
    w, h = image.size
    if max(h, w) / min(h, w) > 4:
        raise ValueError(f"a condition image's aspect ratio must be at most 4:1, got {w}x{h}")
    lo, hi = math.sqrt(min_pixels), math.sqrt(max_pixels)
    scale = lo / min(h, w) if min(h, w) < lo else 1.0
    if max(h, w) * scale > hi:
        scale = hi / max(h, w)
    size = tuple(max(multiple, int(x * scale) // multiple * multiple) for x in (w, h))
    return image if size == image.size else image.resize(size, resample=Image.Resampling.LANCZOS)

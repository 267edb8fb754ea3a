"""Image files read one way everywhere: in training and evaluation (the dataset mapper), in
``demo.py``, test-time augmentation, the export's sample image and the training pictures, so a
model sees at test time the pixels it was trained on; an image prepared for the network one way
by the eager and the exported predictors (:func:`prepare_image`); and one rule for the
INPUT.FORMAT values a model takes (:func:`check_model_input_format`), which the model (and through
it the demo's predictor) and the export tool apply."""

import numpy as np
import torch
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.utils.file_io import PathManager
from PIL import Image, ImageOps

__all__ = [
    "ImageInputError",
    "check_model_input_format",
    "chw_tensor",
    "prepare_image",
    "read_image",
    "to_uint8",
    "unusable_mode",
]

# PIL's modes of 16-bit grayscale images (PNG, TIFF).
_GRAY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


class ImageInputError(ValueError):
    """An image that the model cannot take: a file of 32-bit or float pixels, not an (H, W, 3)
    array of 8-bit or float pixels, or one that the test-time resize cannot resize (so thin that
    a side would shrink to 0 pixels). ``demo.py`` skips such an image, naming the reason, and goes
    on with the others."""


def read_image(path, format=None):
    """Detectron2's ``read_image(path, format)`` (EXIF orientation applied; ``format`` as there:
    "BGR", "RGB", "L", ...), except that a 16-bit grayscale image is scaled to 8 bits by its high
    byte, as OpenCV reads any 16-bit image and PIL a 16-bit RGB one (Detectron2's clips it: all
    but the darkest pixels turn white). A 32-bit integer or float image (PIL mode "I" or "F"),
    whose range is unknown, raises :class:`ImageInputError` (Detectron2's made a float one
    black)."""
    with PathManager.open(path, "rb") as f:
        image = Image.open(f)
        if image.mode in _GRAY16_MODES:
            gray = np.asarray(ImageOps.exif_transpose(image), dtype=np.uint16) >> 8
            return utils.convert_PIL_to_numpy(Image.fromarray(gray.astype(np.uint8)), format)
        reason = unusable_mode(image.mode)
        if reason is not None:
            raise ImageInputError(reason)
    return utils.read_image(path, format=format)


def unusable_mode(mode):
    """Why :func:`read_image` refuses an image of PIL mode ``mode`` (a sentence), or None: a
    32-bit integer or float image ("I" or "F") has no set range to scale to 8 bits. The data
    check asks this of each image's header before training."""
    if mode not in ("I", "F"):
        return None
    kind = "32-bit integer" if mode == "I" else "floating-point"
    return (
        f"a {kind} image (PIL mode {mode}) has no set range to scale to the model's 8-bit "
        "input: convert it to an 8-bit image first."
    )


def check_model_input_format(input_format, key="INPUT.FORMAT"):
    """Refuses an INPUT.FORMAT (named ``key`` in the message) that EfficientPS cannot take: one
    whose images do not have the 3 channels that the backbone and MODEL.PIXEL_MEAN take ("L",
    "RGBA", ...), or that no image is read in ("YUV"). The formats are those of Detectron2's
    ``read_image``, which the data loaders read training images in and :func:`prepare_image`
    converts the predictors' images to: "BGR", "YUV-BT.601" or a 3-channel mode of PIL ("RGB",
    "YCbCr", "LAB", "HSV"). None (``read_image``: the file's own mode, RGB for the 3-channel
    files a model trains on) passes."""
    if input_format is None or input_format in ("BGR", "YUV-BT.601"):
        return
    try:
        channels = Image.getmodebands(input_format)
    except (KeyError, ValueError, TypeError):
        channels = None
    if channels != 3:
        what = "not an image format" if channels is None else f"a {channels}-channel format"
        raise ValueError(
            f"{key} must be 'RGB' or 'BGR' or another 3-channel format of Detectron2's "
            "read_image ('YUV-BT.601' or a 3-channel PIL mode such as 'YCbCr', 'LAB' or 'HSV'), "
            f"but {input_format!r} is {what}: EfficientPS takes 3-channel images; read a "
            "grayscale data set as 'RGB'."
        )


def prepare_image(original_image, augmentation, input_format):
    """What ``DefaultPredictor`` does to an image before the network, checked at each step: the
    image converted to ``input_format`` as the data loaders read a file in it (Detectron2's
    ``read_image``), then resized.

    Args:
        original_image: (H, W, 3) BGR array (as ``cv2.imread`` gives), uint8 or float 0-255.
        augmentation: the test-time resize (a Detectron2 ``Augmentation``, e.g. an
            ``AugmentationList``).
        input_format: the model's INPUT.FORMAT (see :func:`check_model_input_format`). "RGB"
            and "BGR" reorder the channels (None as "RGB": what ``read_image`` reads from a
            3-channel file); any other format is converted by Detectron2's
            ``convert_PIL_to_numpy``, from 8-bit pixels (float ones are rounded, see
            :func:`_bgr_to_format`).
    Returns:
        (3, H', W') C-contiguous, writable array in ``input_format``, resized: of the input
        dtype for "RGB"/"BGR", else of the dtype that ``read_image`` gives (uint8; float64, Y
        in 0-1, for "YUV-BT.601").
    Raises:
        ImageInputError: naming the shape, dtype or resize at fault.
        ValueError: ``input_format`` is not one that a model takes.
    """
    shape = getattr(original_image, "shape", None)
    if not isinstance(original_image, np.ndarray) or len(shape) != 3 or shape[2] != 3:
        got = f"an array of shape {tuple(shape)}" if shape is not None else type(original_image)
        raise ImageInputError(
            f"The predictor takes an (H, W, 3) BGR image (as cv2.imread gives), got {got}: "
            "convert a grayscale or RGBA image to 3 channels first."
        )
    dtype = original_image.dtype
    if dtype != np.uint8 and not np.issubdtype(dtype, np.floating):
        raise ImageInputError(
            f"The predictor takes 8-bit (uint8) or float 0-255 pixels, got {dtype}: scale the "
            "image to 0-255 first (a 16-bit one: image >> 8)."
        )
    height, width = shape[:2]
    if height == 0 or width == 0:
        raise ImageInputError(f"The image has no pixel ({height} x {width}).")
    if input_format in (None, "RGB"):
        original_image = original_image[:, :, ::-1]
    elif input_format != "BGR":
        original_image = _bgr_to_format(original_image, input_format)
    aug_input = T.AugInput(original_image)
    try:
        augmentation(aug_input)
    except (ValueError, RuntimeError) as e:  # PIL or torch refusing a 0-pixel side
        raise ImageInputError(
            f"A {height} x {width} image cannot go through the test-time resize {augmentation} "
            f"(too thin: a side would shrink to 0 pixels): {e}"
        ) from e
    return chw_array(aug_input.image)


def _bgr_to_format(image, input_format):
    """An (H, W, 3) BGR image in ``input_format``, a format other than "RGB"/"BGR": Detectron2's
    ``convert_PIL_to_numpy`` of it, as ``read_image`` converts a file's pixels, so the network
    gets what the data loaders fed it in training."""
    check_model_input_format(input_format, "input_format")
    # PIL holds no float 3-channel image. Rounded and clipped to 8 bits, a float image is what an
    # 8-bit file of it holds: a model in a format other than RGB/BGR was trained on 8-bit files
    # converted by PIL, so it never saw finer values (refusing float input instead would make
    # the predictor's input contract depend on the model's format).
    image = to_uint8(image)
    rgb = Image.fromarray(np.ascontiguousarray(image[:, :, ::-1]))
    return utils.convert_PIL_to_numpy(rgb, input_format)


def to_uint8(image):
    """Float 0-255 pixels rounded and clipped to 8 bits; a uint8 image as it is."""
    return image if image.dtype == np.uint8 else np.clip(np.rint(image), 0, 255).astype(np.uint8)


def chw_array(image):
    """An (H, W, C) array as a new C-contiguous (C, H, W) array, whatever its strides. A copy, not
    ``np.ascontiguousarray``, which keeps a 1 x 1 image as it is (numpy ignores the strides of
    one-long axes): read-only (``np.asarray`` of a PIL image), which torch warns about, or
    flipped (``image[:, ::-1]``), whose negative stride torch refuses."""
    return image.transpose(2, 0, 1).copy()


def chw_tensor(image):
    """:func:`chw_array` as a CPU tensor, sharing its memory."""
    return torch.from_numpy(chw_array(image))

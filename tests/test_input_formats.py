"""INPUT.FORMAT beyond RGB and BGR: a model trained on the images that Detectron2's read_image
reads in "YCbCr" or "YUV-BT.601" trains, and gets the same pixels from the demo's predictor, the
export tool and its runtime, and the training pictures (the predictors convert their BGR input;
before, they refused any format but RGB and BGR)."""

from types import SimpleNamespace

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import DatasetCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from PIL import Image

import demo
from efficientps_d2 import visualization
from efficientps_d2.data import EfficientPSDatasetMapper
from efficientps_d2.data.image_files import (
    check_model_input_format,
    chw_array,
    chw_tensor,
    prepare_image,
)
from efficientps_d2.demo import EfficientPSPredictor, read_bgr_image
from efficientps_d2.export import ExportedPredictor, load
from efficientps_d2.tools import export as export_tool
from tests.common import PERMISSIVE, save_random_model, tiny_config, training_input

FORMATS = ["YCbCr", "YUV-BT.601"]
NO_RESIZE = T.AugmentationList([])


def _image(height, width, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), np.uint8)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "a.png"
    cv2.imwrite(str(path), _image(48, 80))
    return str(path)


def _assert_same_output(got, expected):
    assert torch.equal(got["sem_seg"], expected["sem_seg"])
    assert torch.equal(got["panoptic_seg"][0], expected["panoptic_seg"][0])
    assert got["panoptic_seg"][1] == expected["panoptic_seg"][1]


@pytest.mark.parametrize("image_format", FORMATS)
def test_the_demo_predictor_feeds_the_network_what_the_data_loader_read(image_format, image_file):
    torch.manual_seed(0)
    cfg = tiny_config(PERMISSIVE + ["INPUT.FORMAT", image_format])
    predictor = EfficientPSPredictor(cfg)
    read = utils.read_image(image_file, format=image_format)  # as training reads the file
    image = read_bgr_image(image_file)  # as demo.py reads it
    prepared = prepare_image(image, NO_RESIZE, image_format)
    assert prepared.dtype == read.dtype and np.array_equal(prepared, read.transpose(2, 0, 1))
    got = predictor(image)
    with torch.no_grad():
        expected = predictor.model([{"image": chw_tensor(read), "height": 48, "width": 80}])[0]
    _assert_same_output(got, expected)
    assert got["panoptic_seg"][1]  # segments, so the comparison compares something

    # Resized for the test: converted, then resized, as the evaluation's loader does.
    cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST = 32, 64
    mapped = EfficientPSDatasetMapper(cfg, is_train=False)({"file_name": image_file})["image"]
    resize = T.AugmentationList(utils.build_augmentation(cfg, is_train=False))
    assert torch.equal(torch.as_tensor(prepare_image(image, resize, image_format)), mapped)


def test_float_input_is_rounded_to_the_8_bits_that_a_file_of_it_holds():
    """PIL holds no float 3-channel image: for the formats it converts, a float BGR image is the
    8-bit image it rounds (and clips) to; RGB and BGR keep their float pixels."""
    image = _image(9, 13)
    noise = np.random.RandomState(1).uniform(-0.45, 0.45, image.shape)
    floats = (image + noise).astype(np.float32)
    floats[0, 0] = (-3.0, 260.0, 255.4)
    image[0, 0] = (0, 255, 255)
    for image_format in FORMATS + ["HSV"]:
        expected = prepare_image(image, NO_RESIZE, image_format)
        assert np.array_equal(prepare_image(floats, NO_RESIZE, image_format), expected)
    rgb = prepare_image(floats, NO_RESIZE, "RGB")
    assert rgb.dtype == np.float32 and np.array_equal(rgb, floats[:, :, ::-1].transpose(2, 0, 1))


@pytest.mark.parametrize("image_format", ["L", "RGBA", "YUV", None])
def test_prepare_image_refuses_a_format_that_no_model_takes(image_format):
    if image_format is None:  # no format: RGB, as read_image reads a 3-channel file
        expected = chw_array(_image(3, 4)[:, :, ::-1])
        assert np.array_equal(prepare_image(_image(3, 4), NO_RESIZE, None), expected)
        return
    with pytest.raises(ValueError, match=rf"input_format must be .* but '{image_format}' is"):
        prepare_image(_image(3, 4), NO_RESIZE, image_format)


def test_one_rule_names_the_key_and_the_value():
    for image_format in ("BGR", "RGB", "YCbCr", "LAB", "HSV", "YUV-BT.601", None):
        check_model_input_format(image_format)
    with pytest.raises(ValueError, match="model.input_format must be 'RGB' or 'BGR' .* 'P' is a"):
        check_model_input_format("P", "model.input_format")  # palette: 1 channel of indices


def test_the_demo_refuses_a_format_that_the_model_does_not_take(image_file, tmp_path, capsys):
    """The predictor's own copy of the check is gone: the model's, when it is built, names it."""
    config_file = tmp_path / "tiny.yaml"
    config_file.write_text(tiny_config(["INPUT.FORMAT", "LA"]).dump())
    args = ["--config-file", str(config_file), "--input", image_file]
    args += ["--output", str(tmp_path / "out")]
    assert demo.main(args) == 1
    err = capsys.readouterr().err
    assert "INPUT.FORMAT (model.input_format) must be 'RGB' or 'BGR'" in err
    assert "'LA' is a 2-channel format" in err


def test_the_export_tool_exports_a_ycbcr_model_that_its_runtime_feeds_as_the_demo(
    image_file, tmp_path
):
    config_file = save_random_model(
        tiny_config(PERMISSIVE + ["INPUT.FORMAT", "YCbCr"]), tmp_path, "tiny"
    )
    out = str(tmp_path / "exported")
    args = ["--config-file", config_file, "--format", "torchscript", "--output", out]
    # The tool's checks alone: it refused any format but RGB and BGR before.
    cfg = export_tool.export_config(export_tool.get_parser().parse_args(args))
    assert cfg.INPUT.FORMAT == "YCbCr"
    assert export_tool.main(args + ["--sample-image", image_file]) == 0
    exported = ExportedPredictor(load(out))
    assert exported.input_format == "YCbCr"
    image = read_bgr_image(image_file)
    got, expected = exported(image), EfficientPSPredictor(cfg)(image)
    torch.testing.assert_close(got["sem_seg"], expected["sem_seg"], rtol=1e-4, atol=1e-4)
    assert torch.equal(got["panoptic_seg"][0], expected["panoptic_seg"][0])


def test_a_yuv_model_trains_on_the_float64_images_that_detectron2_reads():
    """Detectron2's read_image gives "YUV-BT.601" images as float64, which the data loader passes
    on: the float32 convolutions refused them ("expected scalar type Double but found Float")."""
    torch.manual_seed(0)
    model = build_model(tiny_config(["INPUT.FORMAT", "YUV-BT.601"])).train()
    batch = training_input(64, 96, [[10, 10, 40, 40]], [0])
    rgb = batch["image"].permute(1, 2, 0).numpy()
    yuv = utils.convert_PIL_to_numpy(Image.fromarray(rgb), "YUV-BT.601")
    batch["image"] = chw_tensor(yuv)
    assert batch["image"].dtype == torch.float64
    with EventStorage():
        losses = model([batch])
        sum(losses.values()).backward()
    assert all(torch.isfinite(v) for v in losses.values()), losses


@pytest.mark.parametrize("image_format", ["YCbCr", "YUV-BT.601", "BGR"])
def test_the_training_pictures_draw_the_image_in_rgb(image_format, image_file, monkeypatch):
    """The pictures of VIS_PERIOD drew a YCbCr image's bytes as if they were RGB."""
    name = f"__input_formats_{image_format}"
    DatasetCatalog.register(name, lambda: [{"file_name": image_file, "image_id": "a"}])
    try:
        hook = visualization.PanopticVisualizationHook(
            1, name, augmentations=[], input_format=image_format
        )
        hook.before_train()
        torch.manual_seed(0)
        hook.trainer = SimpleNamespace(
            model=build_model(tiny_config(["INPUT.FORMAT", image_format]))
        )
        drawn = {}
        monkeypatch.setattr(
            visualization, "draw_panoptic_pair", lambda rgb, *args: drawn.setdefault("rgb", rgb)
        )
        hook.draw()
    finally:
        DatasetCatalog.remove(name)
    rgb = cv2.cvtColor(cv2.imread(image_file), cv2.COLOR_BGR2RGB)
    assert drawn["rgb"].dtype == np.uint8 and drawn["rgb"].shape == rgb.shape
    # PIL's YCbCr round trip is off by a few levels; drawn as RGB, YCbCr would be off by ~100.
    assert np.abs(drawn["rgb"].astype(int) - rgb).max() <= 4

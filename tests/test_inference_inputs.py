"""Inference as a Detectron2 user runs it, on awkward inputs: images the predictors cannot take are
refused by name (and skipped by demo.py, which goes on with the others)."""

import json
import os

import cv2
import numpy as np
import pytest
import torch
from detectron2.data import transforms as T
from detectron2.modeling import build_model
from PIL import Image

import demo
from efficientps_d2.data.image_files import prepare_image
from efficientps_d2.demo import EfficientPSPredictor, ImageInputError, read_bgr_image
from efficientps_d2.engine import load_config
from efficientps_d2.export import ExportedPredictor, export_model, load
from efficientps_d2.modeling import EfficientPSWithTTA
from tests.common import NUM_CLASSES, PERMISSIVE, save_random_model, tiny_config

# Cityscapes' built-in metadata (no files needed): 8 things, 11 stuff classes.
DATASET = "cityscapes_fine_panoptic_val"
# A test resize that shrinks a 1 x 600 image to 0 x 128.
RESIZE = ["INPUT.MIN_SIZE_TEST", 64, "INPUT.MAX_SIZE_TEST", 128]


@pytest.fixture(scope="module")
def config_file(tmp_path_factory):
    """A tiny YAML config with Cityscapes' classes and random weights (MODEL.WEIGHTS)."""
    folder = tmp_path_factory.mktemp("model")
    opts = PERMISSIVE + ["TEST.DETECTIONS_PER_IMAGE", 5, "MODEL.EFFICIENTPS.THING_SEMANTIC_IDS", []]
    opts += ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", 19, "MODEL.ROI_HEADS.NUM_CLASSES", 8]
    cfg = tiny_config(opts)
    cfg.DATASETS.TRAIN, cfg.DATASETS.TEST = (), (DATASET,)
    return save_random_model(cfg, folder, "tiny")


@pytest.fixture(scope="module")
def predictor(config_file):
    return EfficientPSPredictor(load_config(config_file, RESIZE))


def _image(height, width, seed=0):
    return np.random.RandomState(seed).randint(0, 256, (height, width, 3), np.uint8)


def test_images_the_predictors_cannot_take_are_named(predictor, tmp_path):
    export_model(predictor.model, predictor.cfg, str(tmp_path / "ts"), "torchscript")
    exported = ExportedPredictor(load(str(tmp_path / "ts")))
    for p in (predictor, exported):
        # 1 x 600 resizes to 0 x 128: PIL's "height and width must be > 0" before.
        with pytest.raises(
            ImageInputError, match="A 1 x 600 image cannot go through the test-time"
        ):
            p(_image(1, 600))
        with pytest.raises(ImageInputError, match=r"\(H, W, 3\) BGR image .* shape \(64, 96\)"):
            p(_image(64, 96)[:, :, 0])
        with pytest.raises(ImageInputError, match=r"shape \(64, 96, 4\)"):
            p(np.dstack([_image(64, 96), _image(64, 96)[:, :, :1]]))
        with pytest.raises(ImageInputError, match="got uint16"):  # ran as 0-255 values before
            p(_image(64, 96).astype(np.uint16) * 257)
        output = p(_image(2, 300))  # thin, but 2 x 128 after the resize
        assert output["panoptic_seg"][0].shape == (2, 300)


def test_demo_skips_an_image_too_thin_to_resize_and_processes_the_others(config_file, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for name, (height, width) in {"a.png": (64, 96), "b.png": (1, 600), "c.png": (40, 70)}.items():
        cv2.imwrite(str(images / name), _image(height, width))
    out = tmp_path / "out"
    args = ["--config-file", config_file, "--input", str(images), "--output", str(out)]
    assert demo.main(args + ["--save-panoptic", "--opts", *map(str, RESIZE)]) == 0
    with open(out / "predictions.json") as f:
        assert [a["image_id"] for a in json.load(f)["annotations"]] == ["a", "c"]
    assert sorted(os.listdir(out)) == ["a.png", "c.png", "panoptic", "predictions.json"]


def test_demo_names_a_bad_config_override(config_file, capsys):
    """yacs's bare AssertionError ("Non-existent key", "Override list has odd length") came out
    of demo.py as a traceback."""
    base = ["--config-file", config_file, "--input", "x.png", "--output", "out", "--opts"]
    assert demo.main(base + ["MODEL.WEIGHT", "w.pth"]) == 1
    err = capsys.readouterr().err
    assert f"error: MODEL.WEIGHT is not a config key (in the overrides of {config_file})" in err
    assert "closest keys: MODEL.WEIGHTS" in err
    assert demo.main(base + ["MODEL.DEVICE", "cpu", "INPUT.FORMAT"]) == 1
    assert "are KEY VALUE pairs, got an odd number of words" in capsys.readouterr().err
    assert demo.main(base + ["MODEL.DEVICE.X", "cpu"]) == 1  # a key below a value
    assert "MODEL.DEVICE.X is not a config key" in capsys.readouterr().err


def test_demo_refuses_an_output_it_cannot_write_before_building_the_model(
    config_file, tmp_path, capsys, monkeypatch
):
    """Before: '[Errno 17] File exists' after the model was built and an image processed; a
    folder named 'x.png' for several images; drawings written over the input images (--output
    naming the input folder) or over the input video."""
    images = tmp_path / "images"
    images.mkdir()
    for name in ("a.png", "b.jpg"):
        cv2.imwrite(str(images / name), _image(40, 60))
    originals = {name: (images / name).read_bytes() for name in ("a.png", "b.jpg")}
    video = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 5.0, (60, 40))
    writer.write(_image(40, 60))
    writer.release()
    a_file = tmp_path / "notes"
    a_file.write_text("not a folder")
    (tmp_path / "d.png").mkdir()  # an image file name that is a folder: failed at the write

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built before the output was checked")

    monkeypatch.setattr(demo, "VisualizationDemo", no_model)
    base = ["--config-file", config_file]
    cases = [
        (
            ["--input", str(images), "--output", str(a_file)],
            f"The --output '{a_file}' is a file, not a folder",
        ),
        (
            ["--input", str(images / "a.png"), "--output", str(a_file / "o.png")],
            f"Cannot write the --output '{a_file / 'o.png'}': '{a_file}' is not a folder",
        ),
        (["--input", str(images), "--output", str(tmp_path / "x.png")], "names one image file"),
        (
            ["--input", str(images / "a.png"), "--output", str(tmp_path / "d.png")],
            f"The --output '{tmp_path / 'd.png'}' is a folder, not a file name",
        ),
        (["--input", str(images), "--output", str(images)], "would overwrite the input image"),
        (
            ["--input", str(images / "b.jpg"), "--output", str(tmp_path), "--save-panoptic"],
            None,  # b.jpg's drawing goes to tmp_path/b.jpg: no input there; model built
        ),
        (["--video-input", str(video), "--output", str(video)], "would overwrite the input video"),
        (
            ["--video-input", str(video), "--output", str(a_file)],
            f"The --output '{a_file}' is a file, not a folder",
        ),
        (
            ["--video-input", str(video), "--output", str(a_file / "o.mp4")],
            f"Cannot write the --output '{a_file / 'o.mp4'}': '{a_file}' is not a folder",
        ),
    ]
    for args, message in cases:
        if message is None:
            with pytest.raises(AssertionError, match="the model was built"):
                demo.main(base + args)
            continue
        assert demo.main(base + args) == 1, args
        assert message in capsys.readouterr().err, args
    assert {name: (images / name).read_bytes() for name in originals} == originals
    assert sorted(os.listdir(tmp_path)) == ["clip.avi", "d.png", "images", "notes"]  # no output
    assert os.listdir(tmp_path / "d.png") == []


def test_same_file_names_in_two_folders_get_their_own_image_ids(config_file, tmp_path, capsys):
    """Two 'frame.png' (cam1/, cam2/) with --save-panoptic: the run stopped at the second with
    "Two images have the image id 'frame'", its drawings written as frame.png and frame_1.png.
    Two numeric COCO names alike get one ground-truth id: refused before any work."""
    for camera in ("cam1", "cam2"):
        (tmp_path / camera).mkdir()
        cv2.imwrite(str(tmp_path / camera / "frame.png"), _image(40, 60))
        cv2.imwrite(str(tmp_path / camera / "000000000042.png"), _image(40, 60))
    base = ["--config-file", config_file, "--output", str(tmp_path / "out"), "--save-panoptic"]
    inputs = [str(tmp_path / "cam1" / "frame.png"), str(tmp_path / "cam2" / "frame.png")]
    assert demo.main(base + ["--input", *inputs]) == 0, capsys.readouterr().err
    with open(tmp_path / "out" / "predictions.json") as f:
        annotations = json.load(f)["annotations"]
    assert [(a["image_id"], a["file_name"]) for a in annotations] == [
        ("frame", "frame.png"),
        ("frame_1", "frame_1.png"),
    ]
    numeric = [str(tmp_path / c / "000000000042.png") for c in ("cam1", "cam2")]
    assert demo.main(base[:3] + [str(tmp_path / "o2"), "--save-panoptic", "--input", *numeric]) == 1
    assert f"'{numeric[0]}' and '{numeric[1]}' both get the image id 42" in capsys.readouterr().err
    assert not (tmp_path / "o2").exists()


def test_16_bit_images_are_read_as_opencv_reads_them_and_float_ones_are_skipped(
    config_file, tmp_path, capsys
):
    """Detectron2's read_image clipped a 16-bit grayscale PNG to 0-255 (an all-white picture) and
    turned a float TIFF black; demo.py now reads 16-bit images by their high byte, as OpenCV
    reads them (and PIL a 16-bit RGB PNG), and skips 32-bit and float ones by name."""
    values = np.random.RandomState(0).randint(0, 65536, (40, 60)).astype(np.uint16)
    cv2.imwrite(str(tmp_path / "depth.png"), values)  # 16-bit grayscale
    cv2.imwrite(str(tmp_path / "rgb16.png"), np.dstack([values, values[::-1], values // 2]))
    for name in ("depth.png", "rgb16.png"):
        image = read_bgr_image(str(tmp_path / name))
        assert image.dtype == np.uint8
        assert np.array_equal(image, cv2.imread(str(tmp_path / name))), name
    assert np.array_equal(read_bgr_image(str(tmp_path / "depth.png"))[:, :, 1], values >> 8)
    Image.fromarray(np.random.RandomState(1).rand(40, 60).astype(np.float32)).save(
        tmp_path / "float.tif"
    )
    out = tmp_path / "out"
    inputs = [str(tmp_path / n) for n in ("depth.png", "float.tif")]
    assert demo.main(["--config-file", config_file, "--output", str(out), "--input", *inputs]) == 0
    err = capsys.readouterr().err
    assert "Processed 1 images, skipped 1." in err
    assert "float.tif: a floating-point image (PIL mode F) has no set range" in err
    assert os.listdir(out) == ["depth.png"]


def test_a_one_pixel_view_is_prepared_as_a_tensor_can_take_it():
    """A flipped 1 x 1 view (image[:, ::-1]) kept its negative stride through
    np.ascontiguousarray, which torch.as_tensor refused ("At least one stride in the given numpy
    array is negative") in the predictor."""
    pixel = np.array([[[1, 2, 3]]], np.uint8)
    for view, input_format in [(pixel[:, ::-1], "BGR"), (pixel[::-1], "RGB")]:
        image = prepare_image(view, T.AugmentationList([]), input_format)
        assert image.flags.c_contiguous and image.flags.writeable and min(image.strides) > 0
        expected = [1, 2, 3] if input_format == "BGR" else [3, 2, 1]
        assert torch.as_tensor(image).flatten().tolist() == expected


def test_the_model_names_an_image_of_the_wrong_layout():
    """DefaultPredictor-style use of the model itself: an (H, W, 3) tensor failed with "The size
    of tensor a (64) must match the size of tensor b (3)", a numpy array with "'numpy.ndarray'
    object has no attribute 'to'", and a (1, H, W) one ran as a gray image by broadcasting."""
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    image = torch.from_numpy(_image(32, 48))
    cases = [
        (image, r"got a Tensor of shape \(32, 48, 3\): pass an \(H, W, 3\) array as"),
        (image.permute(2, 0, 1).numpy(), r"got a ndarray of shape \(3, 32, 48\)"),
        (image.permute(2, 0, 1)[:1], r"got a Tensor of shape \(1, 32, 48\)"),
    ]
    for bad, message in cases:
        with pytest.raises(ValueError, match=r"batched_inputs\[1\]\['image'\] must be a \(3, H, W"):
            model([{"image": image.permute(2, 0, 1)}, {"image": bad}])
        with pytest.raises(ValueError, match=message):
            model([{"image": bad}])
    assert model([{"image": image.permute(2, 0, 1)}])[0]["panoptic_seg"][0].shape == (32, 48)
    # A model left in training mode (model_zoo.get returns one, as Detectron2's does).
    with pytest.raises(ValueError, match=r"training mode: call model.eval\(\) to predict"):
        model.train()([{"image": image.permute(2, 0, 1)}])


def test_images_without_pixels_and_output_sizes_that_are_no_size_are_named():
    """By the model and by TTA, before any image of the batch runs. An image without pixels
    failed in a convolution ("Kernel size can't be greater than actual input size"), TTA's in a
    ZeroDivisionError; a "height" of 0 gave the input's height, a negative or fractional one
    failed in an interpolation. TTA checked nothing: a gray (1, H, W) image ran broadcast to 3
    channels, an (H, W, 3) one failed in PIL ("Cannot handle this data type")."""
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    tta = EfficientPSWithTTA(tiny_config(), model, min_sizes=[32], max_size=64, flip=False)
    model._inference_network = lambda: pytest.fail("an image ran before the batch was checked")
    image = torch.from_numpy(_image(32, 48)).permute(2, 0, 1)
    cases = [
        ({"image": image[:, :0]}, r"\['image'\] has no pixels: shape \(3, 0, 48\)"),
        ({"image": image[:, :, :0]}, r"\['image'\] has no pixels"),
        ({"image": image[:1]}, r"\['image'\] must be a \(3, H, W\) .* shape \(1, 32, 48\)"),
        ({"image": image.permute(1, 2, 0)}, r"\['image'\] must be a \(3, H, W\)"),
    ]
    for key in ("height", "width"):
        for size in (0, -5, 40.5, "40", True, torch.tensor([30, 20])):
            cases.append(({"image": image, key: size}, rf"\['{key}'\] is the output {key}, a pos"))
    for runner in (model, tta):
        for bad, message in cases:
            with pytest.raises(ValueError, match=r"batched_inputs\[1\]" + message):
                runner([{"image": image}, bad])


def test_an_empty_batch_gives_no_outputs():
    """model([]) failed with Detectron2's bare AssertionError (ImageList of no tensors); one
    output per input is the contract, as for TTA, which returned [] already."""
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    assert model([]) == []
    assert EfficientPSWithTTA(tiny_config(), model)([]) == []
    # Without postprocessing: no images, as model.inference(..., do_postprocess=False) gives them.
    sem_seg_logits, detections, image_sizes = model.inference([], do_postprocess=False)
    assert sem_seg_logits.shape == (0, NUM_CLASSES, 0, 0) and detections == image_sizes == []


def test_tta_runs_an_image_too_thin_for_its_scales():
    """TEST.AUG.MAX_SIZE 128 rounds a 1 x 600 image to 0 x 128: PIL's "height and width must be
    > 0" before. Each augmented size keeps at least one pixel a side."""
    torch.manual_seed(0)
    model = build_model(tiny_config(PERMISSIVE)).eval()
    tta = EfficientPSWithTTA(
        None, model, min_sizes=[64, 96], max_size=128, flip=True, nms_thresh=0.5,
        detections_per_image=5,
    )  # fmt: skip
    image = torch.from_numpy(_image(1, 600)).permute(2, 0, 1)
    output = tta([{"image": image}])[0]
    assert output["panoptic_seg"][0].shape == (1, 600)
    assert output["sem_seg"].shape[1:] == (1, 600)


def test_demo_names_a_broken_config_file(tmp_path, capsys):
    """An empty config file ended in "TypeError: argument of type 'NoneType' is not iterable",
    a key the config lacks in "KeyError: 'Non-existent config key'", and a YAML syntax error in
    a ParserError: all tracebacks out of demo.py."""
    files = {
        "empty.yaml": ("", "is empty, not a mapping of config keys"),
        "list.yaml": ("- MODEL\n", "is a YAML list, not a mapping"),
        "syntax.yaml": ("MODEL: {WEIGHTS: x\n", "is not valid YAML: while parsing a flow mapping"),
        "unknown.yaml": (
            "SOLVER:\n  BASE_LRR: 0.1\n",
            "sets SOLVER.BASE_LRR, which is not a config key; closest keys: SOLVER.BASE_LR",
        ),
    }
    for name, (text, message) in files.items():
        (tmp_path / name).write_text(text)
        args = ["--config-file", str(tmp_path / name), "--input", "x.png", "--output", "out"]
        assert demo.main(args) == 1, name
        err = capsys.readouterr().err
        assert f"error: Config file '{tmp_path / name}'" in err and message in err, (name, err)


def test_a_rerun_removes_what_a_killed_run_left_half_written(config_file, tmp_path):
    """A demo run killed while writing leaves hidden temporary files; the video loop removed
    its own, the image loop none."""
    (tmp_path / "images").mkdir()
    cv2.imwrite(str(tmp_path / "images" / "a.png"), _image(40, 60))
    out = tmp_path / "out"
    (out / "panoptic").mkdir(parents=True)
    stale = [out / ".a.0123456789ab.tmp.png", out / "panoptic" / ".a.ba9876543210.tmp.png"]
    stale.append(out / ".predictions.00000000ffff.tmp.json")
    others = [out / ".b.0123456789ab.tmp.png", out / "notes.txt"]  # not this run's outputs
    for path in stale + others:
        path.write_bytes(b"half written")
    args = ["--config-file", config_file, "--input", str(tmp_path / "images")]
    assert demo.main(args + ["--output", str(out), "--save-panoptic"]) == 0
    assert not [p for p in stale if p.exists()]
    assert all(p.exists() for p in others)


def test_tta_without_a_config_names_the_settings_it_lacks():
    """EfficientPSWithTTA(None, model) failed with "'NoneType' object is not iterable", and
    without nms_thresh it ran until an image had detections (batched_nms(..., None))."""
    torch.manual_seed(0)
    model = build_model(tiny_config()).eval()
    with pytest.raises(ValueError, match="needs min_sizes, max_size, flip, nms_thresh, detections"):
        EfficientPSWithTTA(None, model)
    with pytest.raises(ValueError, match=r"\(cfg=None\) needs nms_thresh\.$"):
        EfficientPSWithTTA(
            None, model, min_sizes=[64], max_size=128, flip=True, detections_per_image=5
        )


def test_a_video_given_to_input_is_refused_before_the_model_suggesting_video_input(
    tmp_path, capsys, monkeypatch
):
    """`--input clip.mp4` built the model, then said "unreadable image (UnidentifiedImageError:
    cannot identify image file ...)" and nothing about --video-input."""
    writer = cv2.VideoWriter(
        str(tmp_path / "clip.avi"), cv2.VideoWriter_fourcc(*"MJPG"), 5, (60, 40)
    )
    writer.write(_image(40, 60))
    writer.release()
    os.link(tmp_path / "clip.avi", tmp_path / "clip.dat")  # a video by its content alone
    cv2.imwrite(str(tmp_path / "a.png"), _image(40, 60))
    (tmp_path / "notes.txt").write_text("FFmpeg plays text files as videos of their letters")

    def no_model(*args, **kwargs):
        raise AssertionError("the model was built")

    monkeypatch.setattr(demo, "VisualizationDemo", no_model)
    monkeypatch.setattr(demo, "build_config", lambda args: None)
    for name in ("clip.avi", "clip.dat"):
        video = str(tmp_path / name)
        args = ["--config-file", "unused.yaml", "--input", video, "--output", str(tmp_path / "o")]
        assert demo.main(args) == 1, name
        err = capsys.readouterr().err
        assert f"{video}: a video, not an image: run it with --video-input {video}" in err, err
    for name in ("a.png", "notes.txt"):  # an image, and a file for the image reader to judge
        args = ["--config-file", "unused.yaml", "--input", str(tmp_path / name)]
        with pytest.raises(AssertionError, match="the model was built"):
            demo.main(args + ["--output", str(tmp_path / "o")])
    assert not (tmp_path / "o").exists()

"""Training skips unreadable samples with a counted warning and stops when there are too many."""

import logging

import pytest
from detectron2.data.common import MapDataset

from efficientps_d2.data import EfficientPSDatasetMapper
from efficientps_d2.data.unreadable import SkipUnreadable, UnreadableDataError
from tests.fixtures import write_panoptic_dataset

# CUSTOM_CATEGORIES in the all-class space: cat 0, dog 1 (things), grass 2, sky 3.
MAPPER = dict(augmentations=[], image_format="BGR", thing_semantic_ids=[0, 1], num_classes=4)


def _records(tmp_path, num_images):
    files = write_panoptic_dataset(str(tmp_path), num_images=num_images)
    records = []
    for record in files["records"]:
        segments = [
            dict(s, category_id={3: 0, 7: 1, 10: 2, 12: 3}[s["category_id"]])
            for s in record["segments_info"]
        ]
        for s in segments:
            s["isthing"] = s["category_id"] < 2
        records.append(dict(record, segments_info=segments))
    return records


def _corrupt(path):
    with open(path, "r+b") as f:
        f.truncate(40)  # the PNG header survives, the data does not


def test_unreadable_image_is_skipped_with_a_counted_warning(tmp_path, caplog):
    records = _records(tmp_path, 4)
    _corrupt(records[1]["file_name"])
    mapper = SkipUnreadable(
        EfficientPSDatasetMapper(True, **MAPPER), num_samples=4, max_fraction=0.25
    )
    dataset = MapDataset(records, mapper)
    with caplog.at_level(logging.WARNING, logger="efficientps_d2"):
        sample = dataset[1]  # the broken one: another sample comes back instead
    assert sample["file_name"] != records[1]["file_name"] and "instances" in sample
    assert (
        "Skipping unreadable training sample (1 so far): Could not read the image '" in caplog.text
    )
    assert records[1]["file_name"] in caplog.text


def test_too_many_unreadable_samples_stop_training_naming_them(tmp_path):
    records = _records(tmp_path, 4)
    _corrupt(records[0]["pan_seg_file_name"])
    _corrupt(records[2]["file_name"])
    mapper = SkipUnreadable(
        EfficientPSDatasetMapper(True, **MAPPER), num_samples=4, max_fraction=0.25
    )
    mapper(records[0])  # 1 of 4: allowed
    with pytest.raises(UnreadableDataError, match="2 of the 4 training samples") as e:
        mapper(records[2])
    assert records[0]["pan_seg_file_name"] in str(e.value)
    assert records[2]["file_name"] in str(e.value)
    with pytest.raises(ValueError, match="MAX_UNREADABLE_FRACTION"):
        SkipUnreadable(mapper, num_samples=4, max_fraction=1.0)

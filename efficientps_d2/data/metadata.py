"""Metadata conventions shared by the data pipeline and the model.

EfficientPS's semantic head predicts *every* class, stuff and things. Detectron2's "standard"
panoptic registrations (``coco_2017_*_panoptic``, ``cityscapes_fine_panoptic_*``) number classes in
that one all-class space: ``thing_dataset_id_to_contiguous_id`` maps each thing's dataset id and
``stuff_dataset_id_to_contiguous_id`` each stuff's dataset id to its index among all classes
(Cityscapes: stuff 0-10, things 11-18), and ``thing_classes``/``stuff_classes`` both list all
classes. Dataset dicts, ``segments_info`` and ``pred_classes`` use those indices.

Mask R-CNN, however, classifies things only: its class k is the k-th thing in all-class order.
``thing_semantic_ids`` gives that translation from metadata, and ``thing_semantic_ids_from_config``
the one the model and the dataset mapper use (a config key, else the metadata).
"""

from detectron2.data import DatasetCatalog, MetadataCatalog


def thing_semantic_ids(metadata):
    """All-class index of each Mask R-CNN class: the sorted contiguous ids of the thing classes.

    Args:
        metadata: a ``Metadata`` or dict with ``thing_dataset_id_to_contiguous_id`` and
            ``stuff_dataset_id_to_contiguous_id`` in Detectron2's "standard" panoptic convention.
    Returns:
        list[int], ascending; entry k is the all-class index of Mask R-CNN class k.
    """
    get = metadata.get if isinstance(metadata, dict) else (lambda k: getattr(metadata, k, None))
    things = get("thing_dataset_id_to_contiguous_id")
    stuff = get("stuff_dataset_id_to_contiguous_id")
    if things == {} and stuff:
        name = get("name")
        raise ValueError(
            (f"Data set '{name}'" if name else "The metadata")
            + " has no thing classes (its thing_dataset_id_to_contiguous_id is empty): "
            "EfficientPS's instance head (Mask R-CNN) needs at least one."
        )
    if not things or stuff is None:
        name = get("name")  # a MetadataCatalog entry's data set
        unregistered = name is not None and name not in DatasetCatalog.list()
        raise ValueError(
            (f"The metadata of data set '{name}'" if name else "The metadata")
            + " needs 'thing_dataset_id_to_contiguous_id' and "
            "'stuff_dataset_id_to_contiguous_id' (Detectron2's 'standard' panoptic metadata)"
            + (
                ": no such data set is registered (register it before building the model, e.g. "
                "with efficientps_d2.data.register_panoptic_dataset)."
                if unregistered
                else "."
            )
        )
    shared = sorted(set(things.values()) & set(stuff.values()))
    if shared:
        raise ValueError(
            f"Contiguous ids {shared} are both thing and stuff; EfficientPS needs Detectron2's "
            "'standard' panoptic metadata (one all-class space), not the 'separated' one."
        )
    return sorted(things.values())


def with_isthing(segments_info, metadata):
    """Copies of ``segments_info`` (contiguous ``category_id``) with ``isthing`` set from the
    metadata where a segment lacks it, as Detectron2's Cityscapes loader leaves it out and its
    ``Visualizer`` needs it."""
    things = set(metadata.thing_dataset_id_to_contiguous_id.values())
    return [dict(s, isthing=s.get("isthing", s["category_id"] in things)) for s in segments_info]


def thing_semantic_ids_from_config(cfg, num_things=None, num_classes=None):
    """Semantic class of each thing class: MODEL.EFFICIENTPS.THING_SEMANTIC_IDS, else
    :func:`thing_semantic_ids` of the first data set in DATASETS.TRAIN, then DATASETS.TEST.

    Args:
        cfg: an EfficientPS config.
        num_things, num_classes: when given, the ids must be ``num_things`` many (Mask R-CNN's
            classes) and lie in ``[0, num_classes)`` (the semantic classes).
    Returns:
        list[int]; entry k is the semantic (all-class) id of Mask R-CNN class k.
    """
    ids = list(cfg.MODEL.EFFICIENTPS.THING_SEMANTIC_IDS)
    source = "MODEL.EFFICIENTPS.THING_SEMANTIC_IDS"
    if not ids:
        names = list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST)
        if not names:
            raise ValueError(
                "MODEL.EFFICIENTPS.THING_SEMANTIC_IDS is empty and no data set is named in "
                "DATASETS.TRAIN/TEST to read it from: set it to the semantic class of each thing."
            )
        ids = thing_semantic_ids(MetadataCatalog.get(names[0]))
        source = f"the metadata of data set '{names[0]}'"
    check_thing_semantic_ids(ids, num_things, num_classes, source=source)
    return [int(i) for i in ids]


def check_thing_semantic_ids(
    ids, num_things=None, num_classes=None, *, source="thing_semantic_ids"
):
    """Fails, naming both spellings of the key at fault, unless there is one id per Mask R-CNN
    class (``num_things``) and each is a semantic class in ``[0, num_classes)``; None skips a
    check. ``source`` says where the ids came from."""
    ids = [int(i) for i in ids]
    if num_things is not None and len(ids) != num_things:
        raise ValueError(
            f"{source} gives {len(ids)} thing classes, but the ROI heads have {num_things} "
            "(MODEL.ROI_HEADS.NUM_CLASSES / model.roi_heads.num_classes): set them to the data "
            "set's number of thing classes."
        )
    if num_classes is not None and any(not 0 <= i < num_classes for i in ids):
        raise ValueError(
            f"{source} gives semantic ids {ids}, not all within [0, {num_classes}) "
            "(MODEL.SEM_SEG_HEAD.NUM_CLASSES / model.sem_seg_head.num_classes): set it to the "
            "data set's number of stuff and thing classes."
        )


def panoptic_metadata(categories):
    """Detectron2 "standard" panoptic metadata from COCO panoptic ``categories``.

    Things come first (by dataset id), then stuff (by dataset id), so thing classes have
    contiguous ids 0..T-1 as Detectron2's ``COCOEvaluator`` requires for box/mask AP.

    Args:
        categories: list of dicts with ``id``, ``name``, ``isthing`` (0/1) and optionally ``color``.
    Returns:
        dict with thing_classes, stuff_classes (both all classes), thing_colors, stuff_colors,
        thing_dataset_id_to_contiguous_id and stuff_dataset_id_to_contiguous_id.
    """
    if not isinstance(categories, (list, tuple)):
        raise ValueError(f"The categories must be a list, got {str(categories)[:200]}.")
    seen = set()
    for c in categories:
        if not isinstance(c, dict):
            raise ValueError(f"Category {c!r} is not an object (a dict).")
        for key in ("id", "name", "isthing"):
            if key not in c:
                raise ValueError(f"Category {c} has no '{key}'.")
        if not isinstance(c["id"], int) or isinstance(c["id"], bool):
            raise ValueError(f"Category {c} has id {c['id']!r}; an integer is needed.")
        if c["isthing"] not in (0, 1):  # True/False compare equal to 1/0
            raise ValueError(f"Category {c} has isthing={c['isthing']!r}; 0 or 1 expected.")
        if c["id"] in seen:
            raise ValueError(f"Category id {c['id']} appears twice in the categories.")
        seen.add(c["id"])
    ordered = sorted(categories, key=lambda c: (not c["isthing"], c["id"]))
    names = [c["name"] for c in ordered]
    colors = [list(c.get("color") or _default_color(i)) for i, c in enumerate(ordered)]
    return {
        "thing_classes": names,
        "thing_colors": colors,
        "stuff_classes": names,
        "stuff_colors": colors,
        "thing_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(ordered) if c["isthing"]
        },
        "stuff_dataset_id_to_contiguous_id": {
            c["id"]: i for i, c in enumerate(ordered) if not c["isthing"]
        },
    }


def _default_color(index):
    # Distinct, deterministic colours for categories that come without one.
    return [(index * 67 + 40) % 256, (index * 137 + 90) % 256, (index * 199 + 160) % 256]

"""The EfficientPS meta-architecture: backbone, semantic head, Mask R-CNN, panoptic fusion."""

import contextlib
import copy
from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, build_sem_seg_head
from detectron2.modeling.postprocessing import detector_postprocess, sem_seg_postprocess
from detectron2.structures import ImageList

from ..data.metadata import thing_semantic_ids_from_config
from .fusion import panoptic_fusion
from .layers import fuse_for_inference


@META_ARCH_REGISTRY.register()
class EfficientPS(GeneralizedRCNN):
    """EfficientPS (Mohan & Valada, IJCV 2021) as a Detectron2 meta-architecture.

    Training input: Detectron2's list of dicts with "image" (3, H, W), "sem_seg" (H, W) over all
    classes and "instances" (gt_boxes, gt_classes, gt_masks). Training output: a dict of losses
    ("loss_sem_seg", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask").

    Inference output, per image, at the requested "height"/"width" (the input size by default):
        "sem_seg": (num_classes, height, width) logits,
        "instances": Instances with pred_boxes, scores, pred_classes, pred_masks, pred_mask_logits,
        "panoptic_seg": (int32 (height, width) segment ids, list of segment dicts).
    Class ids are all-class contiguous ids (Detectron2's "standard" panoptic metadata, see
    ``efficientps_d2.data.metadata``), for things as for stuff.

    Inference runs under ``torch.inference_mode`` (outputs are inference tensors: clone one to
    change it in place). With ``fast_inference`` (MODEL.EFFICIENTPS.FAST_INFERENCE) it runs cached
    copies of the convolutional parts (backbone, semantic head, RPN, box and mask heads) with
    BatchNorm folded into the convs and conv + LeakyReLU fused
    (:func:`~efficientps_d2.modeling.layers.fuse_for_inference`); the copies are rebuilt whenever a
    weight or buffer changes and dropped by ``train()``, and they cost one more copy of the weights.
    """

    @configurable
    def __init__(
        self,
        *,
        sem_seg_head,
        thing_semantic_ids,
        confidence_thresh=0.5,
        overlap_thresh=0.5,
        stuff_area_limit=2048,
        mask_logit_scale=4.0,
        channels_last=True,
        fast_inference=False,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.sem_seg_head = sem_seg_head
        self.register_buffer(
            "thing_semantic_ids", torch.as_tensor(thing_semantic_ids, dtype=torch.long), False
        )
        self.confidence_thresh = confidence_thresh
        self.overlap_thresh = overlap_thresh
        self.stuff_area_limit = stuff_area_limit
        self.mask_logit_scale = mask_logit_scale
        if channels_last:
            # Convs whose weight is channels-last produce channels-last outputs, so the whole
            # network runs in that layout; load_state_dict copies into it, keeping the layout.
            self.to(memory_format=torch.channels_last)
        self.channels_last = channels_last
        self.fast_inference = fast_inference
        self._thing_semantic_id_list = [int(i) for i in thing_semantic_ids]

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        fusion = cfg.MODEL.PANOPTIC_FUSION
        ret.update(
            sem_seg_head=build_sem_seg_head(cfg, ret["backbone"].output_shape()),
            thing_semantic_ids=thing_semantic_ids_from_config(
                cfg, cfg.MODEL.ROI_HEADS.NUM_CLASSES, cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
            ),
            confidence_thresh=fusion.CONFIDENCE_THRESH,
            overlap_thresh=fusion.OVERLAP_THRESH,
            stuff_area_limit=fusion.STUFF_AREA_LIMIT,
            mask_logit_scale=fusion.MASK_LOGIT_SCALE,
            channels_last=cfg.MODEL.EFFICIENTPS.CHANNELS_LAST,
            fast_inference=cfg.MODEL.EFFICIENTPS.FAST_INFERENCE,
        )
        return ret

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        features = self.backbone(images.tensor)

        for key in ("sem_seg", "instances"):
            if key not in batched_inputs[0]:
                raise ValueError(f"EfficientPS needs '{key}' in every training input dict.")
        gt_sem_seg = ImageList.from_tensors(
            [x["sem_seg"].to(self.device) for x in batched_inputs],
            self.backbone.size_divisibility,
            self.sem_seg_head.ignore_value,
            self.backbone.padding_constraints,
        ).tensor
        _, losses = self.sem_seg_head(features, gt_sem_seg, images.image_sizes)

        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)
        losses.update(proposal_losses)
        losses.update(detector_losses)
        return losses

    def inference(self, batched_inputs: List[Dict[str, torch.Tensor]], do_postprocess=True):
        """Runs the network; with ``do_postprocess`` also resizes and fuses (see class docstring).

        Without it, returns (semantic logits at the padded input size (N, C, H, W),
        detector Instances in input coordinates) — what test-time augmentation merges.
        """
        network = self._inference_network()
        with torch.inference_mode(), self._fused_heads(network):
            images = self.preprocess_image(batched_inputs)
            features = network["backbone"](images.tensor)
            sem_seg_logits, _ = network["sem_seg_head"](features)
            proposals, _ = self.proposal_generator(images, features, None)
            if self.fast_inference:
                # ROIAlign reads NCHW: convert the levels once, not once per pooler (box, mask).
                features = {k: v.contiguous() for k, v in features.items()}
            detections, _ = self.roi_heads(images, features, proposals, None)
            if not do_postprocess:
                return sem_seg_logits, detections, images.image_sizes
            return [
                self.postprocess(logits, det, image_size, x.get("height"), x.get("width"))
                for logits, det, image_size, x in zip(
                    sem_seg_logits, detections, images.image_sizes, batched_inputs
                )
            ]

    # The convolutional parts that the fast path replaces with fused copies. The RPN and ROI heads'
    # own logic (thresholds, NMS, box predictor) always runs from this model, so changing e.g.
    # roi_heads.box_predictor.test_score_thresh takes effect with or without the fast path.
    _FUSED_PARTS = {
        "backbone": ("backbone",),
        "sem_seg_head": ("sem_seg_head",),
        "rpn_head": ("proposal_generator", "rpn_head"),
        "box_head": ("roi_heads", "box_head"),
        "mask_head": ("roi_heads", "mask_head"),
    }

    def _part(self, path):
        module = self
        for name in path:
            module = getattr(module, name)
        return module

    def _inference_network(self):
        """{part name: module} that inference runs: this model's own modules, or fused copies of
        them (``fast_inference``), rebuilt whenever one of their weights or buffers changes."""
        parts = {name: self._part(path) for name, path in self._FUSED_PARTS.items()}
        if not self.fast_inference:
            return parts
        # A weight that is loaded, trained or moved changes its version counter or storage.
        tensors = [t for module in parts.values() for t in module.state_dict().values()]
        signature = [(t._version, t.data_ptr(), t.dtype) for t in tensors]
        cached = self.__dict__.get("_fused_network")  # not a submodule: no state_dict entries
        if cached is None or cached[0] != signature:
            self.__dict__.pop("_fused_network", None)  # free the stale copy first
            # Ordinary (not inference) tensors even when called under inference_mode.
            with torch.inference_mode(False), torch.no_grad():
                network = copy.deepcopy(torch.nn.ModuleDict(parts))
                network = fuse_for_inference(network, channels_last=self.channels_last)
            cached = (signature, network)
            self.__dict__["_fused_network"] = cached
        return cached[1]

    @contextlib.contextmanager
    def _fused_heads(self, network):
        """Puts the fused RPN, box and mask heads in place of this model's own for one call."""
        swaps = [
            (self._part(path[:-1]), path[-1], network[name])
            for name, path in self._FUSED_PARTS.items()
            if len(path) == 2 and network[name] is not self._part(path)
        ]
        originals = [parent._modules[attr] for parent, attr, _ in swaps]
        try:
            for parent, attr, fused in swaps:
                parent._modules[attr] = fused
            yield
        finally:
            for (parent, attr, _), original in zip(swaps, originals):
                parent._modules[attr] = original

    def train(self, mode: bool = True):
        if mode:
            self.__dict__.pop("_fused_network", None)
        return super().train(mode)

    def postprocess(self, sem_seg_logits, detections, image_size, height=None, width=None):
        """Resizes one image's outputs to (height, width) and fuses them into a panoptic result.

        Args:
            sem_seg_logits: (C, H_pad, W_pad) logits; detections: Instances at ``image_size``.
        """
        height = height or image_size[0]
        width = width or image_size[1]
        with torch.inference_mode():
            return self._postprocess(sem_seg_logits, detections, image_size, height, width)

    def _postprocess(self, sem_seg_logits, detections, image_size, height, width):
        if (height, width) == tuple(image_size):
            # What sem_seg_postprocess gives, without its same-size (identity) interpolation.
            sem_seg = sem_seg_logits[:, :height, :width]
        else:
            sem_seg = sem_seg_postprocess(sem_seg_logits, image_size, height, width)
        instances = detector_postprocess(detections, height, width)
        panoptic_seg, segments_info = panoptic_fusion(
            sem_seg,
            instances,
            thing_semantic_ids=self._thing_semantic_id_list,
            confidence_thresh=self.confidence_thresh,
            overlap_thresh=self.overlap_thresh,
            stuff_area_limit=self.stuff_area_limit,
            mask_logit_scale=self.mask_logit_scale,
        )
        # Mask R-CNN numbers things 0..T-1; users, Visualizer and Detectron2's evaluators expect
        # the all-class contiguous ids of the "standard" panoptic metadata.
        semantic_ids = self._thing_semantic_id_list
        for segment in segments_info:
            if segment["isthing"]:
                segment["category_id"] = semantic_ids[segment["category_id"]]
        instances.pred_classes = self.thing_semantic_ids[instances.pred_classes]
        return {
            "sem_seg": sem_seg,
            "instances": instances,
            "panoptic_seg": (panoptic_seg, segments_info),
        }

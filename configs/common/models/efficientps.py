# EfficientPS-B5 with the settings of Base-EfficientPS.yaml, as a Detectron2 LazyConfig model.
# Leaf configs set the classes (from their data set's metadata) and override what they change.
from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers, StandardROIHeads

from efficientps_d2.engine.lazy_config import thing_semantic_ids_of
from efficientps_d2.modeling import EfficientPS, EfficientPSSemSegHead
from efficientps_d2.modeling.backbone import EfficientNet, TwoWayFPN
from efficientps_d2.modeling.instance_head import SeparableConvMaskHead, SeparableConvRPNHead

FEATURES = ["p2", "p3", "p4", "p5"]
SCALES = (1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32)

model = L(EfficientPS)(
    backbone=L(TwoWayFPN)(
        bottom_up=L(EfficientNet)(
            variant="b5",
            norm="BN",
            leaky_relu_slope=0.01,
            squeeze_excitation=False,  # the paper removes it
            stochastic_depth_prob=0.0,  # off, as in the official training
            out_features=["stride4", "stride8", "stride16", "stride32"],
            freeze_at=0,
            activation_checkpointing=False,
        ),
        in_features=["stride4", "stride8", "stride16", "stride32"],
        out_channels=256,
        norm="BN",
        top_block=False,
    ),
    sem_seg_head=L(EfficientPSSemSegHead)(
        input_shape={
            f: L(ShapeSpec)(channels="${....backbone.out_channels}", stride=s)
            for f, s in zip(FEATURES, [4, 8, 16, 32])
        },
        num_classes=19,
        convs_dim=128,
        dpc_channels=256,
        norm="BN",
        ignore_value=255,
        loss_weight=1.0,
        hard_pixel_fraction=0.25,
        hard_pixel_normalization="image",  # the paper's 4/(H*W)
        activation_checkpointing=False,
    ),
    proposal_generator=L(RPN)(
        in_features=FEATURES,
        head=L(SeparableConvRPNHead)(
            in_channels="${...backbone.out_channels}", num_anchors=3, norm="BN"
        ),
        # Anchor scale 8 at strides 4, 8, 16, 32.
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[32], [64], [128], [256]],
            aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(
            thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True
        ),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_topk=(2000, 1000),  # (training, inference)
        post_nms_topk=(2000, 1000),  # 2000 in training, as the official training
        nms_thresh=0.7,
        smooth_l1_beta=0.1111,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes=8,
        batch_size_per_image=256,  # as the official training
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(
            thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False
        ),
        box_in_features=FEATURES,
        box_pooler=L(ROIPooler)(
            output_size=7, scales=SCALES, sampling_ratio=0, pooler_type="ROIAlignV2"
        ),
        box_head=L(FastRCNNConvFCHead)(
            input_shape=L(ShapeSpec)(channels="${....backbone.out_channels}", height=7, width=7),
            conv_dims=[],
            fc_dims=[1024, 1024],
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=1024),  # box_head.fc_dims[-1]
            box2box_transform=L(Box2BoxTransform)(weights=(10.0, 10.0, 5.0, 5.0)),
            num_classes="${..num_classes}",
            test_score_thresh=0.5,
            test_nms_thresh=0.5,
            test_topk_per_image=100,
            smooth_l1_beta=1.0,
        ),
        mask_in_features=FEATURES,
        mask_pooler=L(ROIPooler)(
            output_size=14, scales=SCALES, sampling_ratio=0, pooler_type="ROIAlignV2"
        ),
        mask_head=L(SeparableConvMaskHead)(
            input_shape=L(ShapeSpec)(channels="${....backbone.out_channels}", height=14, width=14),
            num_classes="${..num_classes}",
            conv_dims=[256, 256, 256, 256, 256],  # 4 separable convs, then the deconv
            conv_norm="BN",
        ),
    ),
    # From the training data set's metadata, as MODEL.EFFICIENTPS.THING_SEMANTIC_IDS: [] does:
    # overriding dataloader.train.dataset.names moves the model's thing ids along with the data.
    thing_semantic_ids=L(thing_semantic_ids_of)(dataset_name="${dataloader.train.dataset.names}"),
    # RGB with torchvision's ImageNet statistics, which torchvision's EfficientNet weights expect.
    pixel_mean=[123.675, 116.28, 103.53],
    pixel_std=[58.395, 57.12, 57.375],
    input_format="RGB",
    vis_period=0,
    confidence_thresh=0.5,
    overlap_thresh=0.5,
    stuff_area_limit=2048,
    mask_logit_scale=4.0,
    channels_last=True,
    # Inference paths (MODEL.EFFICIENTPS.* in YAML configs): folded/fused copy, dense-network dtype
    # ("float32", "bfloat16", "float16"), CUDA graphs per padded input size (ROI heads too, at
    # fixed row counts), torch.compile.
    fast_inference=True,
    inference_dtype="float32",
    cuda_graph=False,
    cuda_graph_cache_size=4,
    cuda_graph_roi_heads=False,
    compile=False,
    compile_mode="default",
    compile_training=False,
    # In-place activated BatchNorm (MODEL.EFFICIENTPS.INPLACE_ABN): BN + LeakyReLU pairs keep only
    # their output for the backward pass.
    inplace_abn=False,
)

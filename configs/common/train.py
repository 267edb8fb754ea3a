# Training settings for train_net.py's LazyConfig flow (Detectron2's common/train.py layout), with
# the optimizer and schedule of Base-EfficientPS.yaml.
from detectron2.config import LazyCall as L
from detectron2.solver.build import get_default_optimizer_params

from efficientps_d2.solver import sgd_with_full_model_gradient_clipping, warmup_multi_step_lr

train = dict(
    output_dir="./output",
    # torchvision's ImageNet weights (see efficientps_d2/torchvision_weights.py); "": from scratch.
    init_checkpoint="",
    # True accepts init_checkpoint weights that leave model tensors random (missing) or hold
    # tensors of another shape (skipped, e.g. to fine-tune on other classes); False refuses them
    # before training, as evaluation refuses misfits. Converted ImageNet backbones are accepted.
    allow_partial_weights=False,
    max_iter=90000,
    # precision: the autocast dtype under AMP (CUDA), "float16" (with gradient scaling) or
    # "bfloat16" (float32's range: no gradient scaling, no per-step sync).
    amp=dict(enabled=False, precision="float16"),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=5000, max_to_keep=100),
    eval_period=0,
    log_period=20,
    device="cuda",
    # Open every panoptic PNG of the train/test data sets before starting and check its mode, size
    # and ids against segments_info (efficientps_d2.data.check; with several processes, on local
    # rank 0 of each machine only, its verdict shared); False checks the json only.
    check_pngs=True,
    # > 0: every vis_period iterations, the panoptic prediction next to the ground truth of the
    # first training image goes to tensorboard (as VIS_PERIOD; efficientps_d2.visualization).
    vis_period=0,
    # Test-time augmentation (as TEST.AUG): with enabled, evaluation after training and with
    # --eval-only also runs the model at these shorter-side sizes (longer side capped at max_size)
    # and flipped, merged by EfficientPSWithTTA; results are named "<task>_TTA".
    tta=dict(enabled=False, min_sizes=[512, 1024, 1536], max_size=4096, flip=True),
    # [task, metric, expected value, tolerance] rows (as TEST.EXPECTED_RESULTS), e.g.
    # [["panoptic_seg", "PQ", 60.4, 0.5]]: after training and --eval-only, the main process checks
    # the results with Detectron2's verify_results and exits with status 1 when one is off.
    expected_results=[],
)

# SGD with one norm over all gradients clipped at 35, as the official training.
optimizer = L(sgd_with_full_model_gradient_clipping)(
    # params.model is set to the model before instantiating (Detectron2's convention).
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=0.07,
    momentum=0.9,
    weight_decay=1e-4,
    clip_value=35.0,
    norm_type=2.0,
)

# Linear warm-up from 1/3 over 500 iterations, then steps of 0.1 (leaf configs set the steps).
lr_multiplier = L(warmup_multi_step_lr)(
    max_iter="${train.max_iter}", steps=[67500, 81000], warmup_iters=500, warmup_factor=0.3333
)

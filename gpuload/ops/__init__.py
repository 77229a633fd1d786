"""Declarative image ops compiled into ONE fused kernel (CPU and CUDA from one source).

    from gpuload import ops
    plan = ops.compile_ops([ops.RandomResizedCrop(224), ops.RandomHorizontalFlip(),
                            ops.ColorJitter(0.4, 0.4, 0.4),
                            ops.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    params = plan.sample_params(heights, widths, rows, seed, epoch)    # (B, NUM_PARAMS) float32
    windows = plan.scale_window(params, heights, widths, dct_scale=s)  # decoded-buffer coords
    stage = ops.FusedImageStage(plan, batch_size=256, device="cpu")
    out = stage.run(src, meta, windows, params)                        # plan.out_shape(B)

Parameter columns: PARAM_Y0, PARAM_X0, PARAM_H, PARAM_W (window in original-image pixels),
PARAM_FLIP, PARAM_BRIGHTNESS, PARAM_CONTRAST, PARAM_SATURATION. The exact per-pixel math is
documented in ``gpuload.kernels.fused``.
"""

from gpuload.kernels.fused import (
    NUM_PARAMS,
    PARAM_BRIGHTNESS,
    PARAM_CONTRAST,
    PARAM_FLIP,
    PARAM_H,
    PARAM_SATURATION,
    PARAM_W,
    PARAM_X0,
    PARAM_Y0,
)
from gpuload.ops.plan import ImagePlan, compile_ops, supported_op_names
from gpuload.ops.stage import FusedImageStage, aligned_empty, wait_for_warmups, warm_up
from gpuload.ops.transforms import (
    SUPPORTED_OPS,
    CenterCrop,
    ColorJitter,
    Normalize,
    RandomHorizontalFlip,
    RandomResizedCrop,
    Resize,
    ToDtype,
    ToLayout,
    parse_ops,
)

__all__ = [
    "RandomResizedCrop",
    "Resize",
    "CenterCrop",
    "RandomHorizontalFlip",
    "ColorJitter",
    "Normalize",
    "ToDtype",
    "ToLayout",
    "SUPPORTED_OPS",
    "ImagePlan",
    "compile_ops",
    "parse_ops",
    "supported_op_names",
    "FusedImageStage",
    "aligned_empty",
    "warm_up",
    "wait_for_warmups",
    "NUM_PARAMS",
    "PARAM_Y0",
    "PARAM_X0",
    "PARAM_H",
    "PARAM_W",
    "PARAM_FLIP",
    "PARAM_BRIGHTNESS",
    "PARAM_CONTRAST",
    "PARAM_SATURATION",
]

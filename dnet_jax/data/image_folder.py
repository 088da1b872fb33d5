"""The split-list decoding and crop functions under the name the augmentation modules import.

`dnet_jax.data.color_randaugment` and `pil_ops` were written against a module
`image_folder` that the runner now calls `split_lists`; this module re-exports the
pieces they use, so both names give the same functions.
"""

from dnet_jax.data.split_lists import (  # noqa: F401 (re-exports)
    IMAGENET_MEAN, IMAGENET_STD, _tf, decode_image, preprocess, random_resized_crop,
    resize_center_crop)

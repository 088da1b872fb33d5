"""Data layer: long-tailed splits, sources, augmentation and batching.

* ``long_tail``: counts ``n_c = int(n_max * rho ** (-c / (C - 1)))``, the
  meta-set split, the "public" / "ldam" subsampling protocols, shot groups.
* ``sources``: digits (default, no download), TFDS, CIFAR pickles, ``.npz``.
* ``augment``: on-device crop/flip, Cutout, normalisation (pure JAX).
* ``batching``: deterministic, resumable host-side index samplers.
"""

from dnet_jax.data.augment import (CIFAR10_MEAN, CIFAR10_STD, CIFAR100_MEAN, CIFAR100_STD,
                                   CropFlipParams, CutoutParams, apply_crop_flip,
                                   channel_mean_std, crop_flip_params, cutout, cutout_mask,
                                   cutout_params, make_preprocess, normalize, random_crop_flip)
from dnet_jax.data.batching import (class_balanced_indices, epoch_batches, epoch_permutation,
                                    meta_batch_indices, meta_batches, num_batches,
                                    padded_batches)
from dnet_jax.data.long_tail import (PROTOCOLS, LongTailedData, MetaSplit, build_long_tailed,
                                     long_tailed_counts, make_long_tailed, shot_groups,
                                     split_meta)
from dnet_jax.data.safe_pickle import RefusedPickleError, RestrictedUnpickler, safe_load, safe_loads
from dnet_jax.data.sources import (SOURCES, SourceData, load_cifar_pickle_source,
                                   load_digits_source, load_long_tailed, load_npz_source,
                                   load_source, load_tfds_source)

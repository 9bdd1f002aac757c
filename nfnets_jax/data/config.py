"""`config.data`: the input pipeline's settings, their NFNet defaults and their validation.

Defaults follow the official NFNet-F0 experiment (official `experiment_nfnets.py:get_config`): ImageNet
(`imagenet2012`), 192 px training crops, 256 px evaluation with `resize_crop_32`, RandAugment
4 layers at magnitude 5, MixUp (Beta(0.2, 0.2)) on half the batch and CutMix on the other half,
RandAugment applied after mixing (`augment_before_mix=False`).

Every field is checked here, before any dataset is opened, so that a typo fails at the door with
a message that says what to change.

The digits source is already small and square: it is served at `digits.image_size` for both
training and evaluation (`image_size`, `eval_image_size` and `eval_preprocess` do not apply),
and `digits_data_config()` sets the matching demo settings. Other small fixed-size images
(Fashion-MNIST, CIFAR) take `train_preprocess='pad_crop_flip'` and `eval_preprocess='none'`
instead of the ImageNet crops; `fashion_mnist_data_config()` sets them for Fashion-MNIST.
"""

from __future__ import annotations

import ml_collections

MIX_MODES = ("mixup_cutmix", "mixup", "cutmix", "none")
TRAIN_PREPROCESS_MODES = ("inception_crop", "pad_crop_flip")
EVAL_PREPROCESS_MODES = ("resize_crop_32", "crop_resize", "resize", "none")
BUILTIN_SOURCES = ("digits", "synthetic")


def default_data_config() -> ml_collections.ConfigDict:
    """The NFNet-F0 ImageNet input settings (docs/recipe.md, input pipeline)."""
    config = ml_collections.ConfigDict()
    config.name = "imagenet2012"  # 'digits' | 'synthetic' | any TFDS image-classification name
    config.data_dir = None  # TFDS data_dir; None means TFDS's default (~/tensorflow_datasets)
    config.train_split = "train"  # the official NFNet runs train on the full train split
    config.eval_split = "validation"  # ImageNet's 50k validation set, the paper's test set
    config.image_size = 192  # train px (F0); variant_info(name)["train_imsize"]
    config.eval_image_size = 256  # test px (F0); variant_info(name)["test_imsize"]
    config.train_preprocess = "inception_crop"  # one of TRAIN_PREPROCESS_MODES
    config.max_shift = 4  # 'pad_crop_flip': black padding in px, so a shift of up to this much
    config.eval_preprocess = "resize_crop_32"  # one of EVAL_PREPROCESS_MODES

    config.augment = ml_collections.ConfigDict()
    config.augment.randaugment_layers = 4  # 0 disables RandAugment
    config.augment.randaugment_magnitude = 5  # F0 5, F1-F2 10, F3+ 15
    config.augment.mixup_alpha = 0.2
    config.augment.mix = "mixup_cutmix"  # one of MIX_MODES
    config.augment.augment_before_mix = False  # NFNets: RandAugment after mixing

    config.shuffle_buffer = 10_000  # examples held by the (per-epoch, seeded) shuffle
    config.num_parallel_calls = -1  # -1: tf.data.AUTOTUNE
    config.prefetch = 2  # host batches prefetched by tf.data
    config.threads = 0  # tf.data private thread pool size; 0: TF's default

    config.synthetic = ml_collections.ConfigDict()
    config.synthetic.num_classes = 1000
    config.synthetic.num_train_examples = 1_281_167
    config.synthetic.num_eval_examples = 50_000
    config.synthetic.height = 375  # roughly a typical ImageNet photo (500x375)
    config.synthetic.width = 500
    config.synthetic.encode_jpeg = True  # decode JPEGs as the real pipeline does

    config.digits = ml_collections.ConfigDict()
    config.digits.image_size = 32  # the 8x8 digits are upsampled to this square RGB size
    config.digits.test_fraction = 0.2
    config.digits.split_seed = 0  # fixed: the train/test split never changes
    config.digits.max_shift = 2  # light augmentation: random translation in px (no flips)

    # The TFDS builder `fashion_mnist_local` (nfnets_jax/data/fashion_mnist.py) prepares itself
    # from the idx files in this folder, where Debian's `dataset-fashion-mnist` installs them.
    config.fashion_mnist_local = ml_collections.ConfigDict()
    config.fashion_mnist_local.manual_dir = "/usr/share/datasets/fashion-mnist"
    return config


def digits_data_config() -> ml_collections.ConfigDict:
    """Settings for the offline scikit-learn digits demo.

    The ImageNet recipe does not fit 32x32 digits: RandAugment translates by up to 50 px and
    flips/crops destroy the class. The demo keeps only light random shifts.
    """
    config = default_data_config()
    config.name = "digits"
    config.train_split = "train"
    config.eval_split = "test"
    config.image_size = config.digits.image_size
    config.eval_image_size = config.digits.image_size
    config.eval_preprocess = "none"
    config.augment.randaugment_layers = 0
    config.augment.mix = "none"
    config.shuffle_buffer = 0
    return config


def fashion_mnist_data_config() -> ml_collections.ConfigDict:
    """Fashion-MNIST (28×28 grey, read through TFDS from Debian's idx files) at its own size.

    The ImageNet crops do not fit 28×28 images (an Inception crop keeps as little as 8% of the
    image; squash-and-crop cuts the border): training shifts by up to 4 px (zero padding, then a
    random 28×28 crop) and flips left-right (a mirrored shirt is still a shirt), the standard
    augmentation for CIFAR-sized images; evaluation takes the images as they are.
    RandAugment and MixUp/CutMix are off: the reference run (docs/fashion_mnist.md) is short.
    """
    config = default_data_config()
    config.name = "fashion_mnist_local"
    config.train_split = "train"
    config.eval_split = "test"
    config.image_size = 28
    config.eval_image_size = 28
    config.train_preprocess = "pad_crop_flip"
    config.max_shift = 4
    config.eval_preprocess = "none"
    config.augment.randaugment_layers = 0
    config.augment.mix = "none"
    return config


def validate_data_config(config: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the field and the valid choices for any bad setting."""
    problems = []

    def need(condition: bool, message: str) -> None:
        if not condition:
            problems.append(message)

    need(isinstance(config.name, str) and bool(config.name),
         "config.data.name must be 'digits', 'synthetic' or a TFDS dataset name such as "
         "'imagenet2012'")
    need(config.train_preprocess in TRAIN_PREPROCESS_MODES,
         f"config.data.train_preprocess={config.train_preprocess!r}; choose one of "
         f"{TRAIN_PREPROCESS_MODES}")
    need(isinstance(config.max_shift, int) and config.max_shift >= 0,
         "config.data.max_shift must be an integer >= 0 (px)")
    need(config.eval_preprocess in EVAL_PREPROCESS_MODES,
         f"config.data.eval_preprocess={config.eval_preprocess!r}; choose one of "
         f"{EVAL_PREPROCESS_MODES}")
    for field in ("image_size", "eval_image_size"):
        value = config[field]
        need(isinstance(value, int) and value > 0,
             f"config.data.{field}={value!r} must be a positive integer (pixels)")
    augment = config.augment
    need(augment.mix in MIX_MODES,
         f"config.data.augment.mix={augment.mix!r}; choose one of {MIX_MODES}")
    need(isinstance(augment.randaugment_layers, int) and augment.randaugment_layers >= 0,
         "config.data.augment.randaugment_layers must be an integer >= 0 (0 disables it)")
    need(0 <= augment.randaugment_magnitude <= 30,
         "config.data.augment.randaugment_magnitude must be in [0, 30] (NFNets use 5, 10, 15)")
    need(augment.mixup_alpha > 0,
         "config.data.augment.mixup_alpha must be > 0 (the Beta(alpha, alpha) parameter)")
    need(isinstance(config.shuffle_buffer, int) and config.shuffle_buffer >= 0,
         "config.data.shuffle_buffer must be an integer >= 0")
    need(config.num_parallel_calls == -1 or config.num_parallel_calls >= 1,
         "config.data.num_parallel_calls must be -1 (autotune) or >= 1")
    need(config.prefetch >= 0, "config.data.prefetch must be >= 0")
    if config.name == "synthetic":
        synthetic = config.synthetic
        need(synthetic.num_classes >= 1, "config.data.synthetic.num_classes must be >= 1")
        need(synthetic.num_train_examples >= 1 and synthetic.num_eval_examples >= 1,
             "config.data.synthetic.num_train_examples/num_eval_examples must be >= 1")
        need(synthetic.height >= 8 and synthetic.width >= 8,
             "config.data.synthetic.height/width must be >= 8 px")
    if config.name == "digits":
        digits = config.digits
        need(digits.image_size >= 8, "config.data.digits.image_size must be >= 8 px")
        need(0 < digits.test_fraction < 1, "config.data.digits.test_fraction must be in (0, 1)")
        need(config.train_split in ("train", "test") and config.eval_split in ("train", "test"),
             "the digits source has splits 'train' and 'test'; set config.data.train_split and "
             "config.data.eval_split to one of them")
    if problems:
        raise ValueError("Invalid config.data:\n  - " + "\n  - ".join(problems))

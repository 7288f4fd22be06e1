"""Frozen image backbones: image bytes -> RGB at the backbone's size -> feature grid.

Every backbone is a Keras model taking float32 RGB images in [0, 255] of shape
[batch, size, size, 3] and returning a feature grid [batch, h, w, c]. Its preprocessing is a
layer inside the model, so feature extraction and the exported SavedModel cannot disagree on it.

| name               | size | grid        | preprocessing                   |
|--------------------|------|-------------|---------------------------------|
| patches            | 96   | 8 x 8 x 432 | x / 255, cut into 12x12 patches |
| mobilenet_v3_small | 224  | 7 x 7 x 576 | built into the Keras model      |
| mobilenet_v3_large | 224  | 7 x 7 x 960 | built into the Keras model      |
| efficientnet_b0    | 224  | 7 x 7 x 1280| built into the Keras model      |
| inception_v3       | 299  | 8 x 8 x 2048| x / 127.5 - 1                   |
| resnet50           | 224  | 7 x 7 x 2048| caffe: BGR, ImageNet mean off   |

`patches` has no weights: the image is cut into a grid of raw pixel patches (as a ViT sees
it) and the captioner learns the projection, so the embedded default needs no download.
"""

from __future__ import annotations

import dataclasses
import os
import warnings

import keras
import tensorflow as tf
from einops import rearrange

from dist_caption import config
from dist_caption.errors import UserError


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    name: str
    size: int
    preprocessing: str  # the `Preprocess` mode
    application: str | None  # keras.applications constructor, None for `patches`
    extra_args: tuple = ()


BACKBONES = {spec.name: spec for spec in (
    BackboneSpec("patches", 96, "unit", None),
    BackboneSpec("mobilenet_v3_small", 224, "none", "MobileNetV3Small",
                 (("include_preprocessing", True),)),
    BackboneSpec("mobilenet_v3_large", 224, "none", "MobileNetV3Large",
                 (("include_preprocessing", True),)),
    BackboneSpec("efficientnet_b0", 224, "none", "EfficientNetB0"),
    BackboneSpec("inception_v3", 299, "tf", "InceptionV3"),
    BackboneSpec("resnet50", 224, "caffe", "ResNet50"),
)}
if tuple(BACKBONES) != config.BACKBONES:  # the --backbone choices are declared in config.py
    raise ImportError(f"backbones.py has {tuple(BACKBONES)}, config.BACKBONES "
                      f"{config.BACKBONES}: make them agree")
PATCH_SIZE = 12
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)


@keras.saving.register_keras_serializable(package="dist_caption")
class Preprocess(keras.layers.Layer):
    """The backbone's own input scaling, from RGB in [0, 255]."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        if mode not in ("none", "unit", "tf", "caffe"):
            raise ValueError(f"unknown preprocessing mode {mode!r}")
        self.mode = mode

    def call(self, images):
        if self.mode == "unit":
            return images / 255.0
        if self.mode == "tf":
            return images / 127.5 - 1.0
        if self.mode == "caffe":
            return images[..., ::-1] - tf.constant(_CAFFE_MEAN_BGR, images.dtype)
        return images

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="dist_caption")
class Patches(keras.layers.Layer):
    """[b, H, W, c] -> [b, H/p, W/p, p*p*c]: non-overlapping raw pixel patches."""

    def __init__(self, patch: int, **kwargs):
        super().__init__(**kwargs)
        self.patch = patch

    def call(self, images):
        return rearrange(images, "b (h p1) (w p2) c -> b h w (p1 p2 c)",
                         p1=self.patch, p2=self.patch)

    def get_config(self):
        return {**super().get_config(), "patch": self.patch}


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(name: str, weights: str = "imagenet") -> keras.Model:
    """The frozen backbone `name`, preprocessing included.

    `weights` is 'imagenet' (downloaded by Keras), 'none' (random, for tests and `patches`)
    or the path of a Keras weights file for the model without its classifier top.
    """
    spec = get_spec(name)
    inputs = keras.Input((spec.size, spec.size, 3), dtype="float32", name="images")
    x = Preprocess(spec.preprocessing, name="preprocess")(inputs)
    if spec.application is None:
        outputs = Patches(PATCH_SIZE, name="patches")(x)
    else:
        if weights not in ("imagenet", "none") and not os.path.isfile(weights):
            raise UserError(f"--weights {weights}: no such file; pass 'imagenet', 'none' or "
                            f"the path of a Keras weights file for {name} without its top")
        ctor = getattr(keras.applications, spec.application)
        try:
            # Keras warns about each layer group of a weights file it cannot match, then
            # raises: for a wrong file, dozens of warnings above our one-line error. So its
            # warnings are held back, and shown again unless the file is refused below.
            with warnings.catch_warnings(record=True) as held:
                base = ctor(input_shape=(spec.size, spec.size, 3), include_top=False,
                            weights=None if weights == "none" else weights,
                            **dict(spec.extra_args))
        except Exception as e:  # Keras raises a bare Exception for a failed download.
            if weights == "imagenet" and "URL fetch failure" in str(e):
                raise UserError(
                    f"could not download the imagenet weights for {name} (no network?): "
                    f"fetch the Keras '{spec.application}' no-top weights file where you can "
                    f"and pass --weights /path/to/that.h5") from None
            if weights not in ("imagenet", "none"):
                # Keras's message: a summary line, then (after a blank line) what is wrong
                # with the first layer, then every layer: the first two make the one line.
                detail = " ".join(str(e).split("List of objects")[0].split())[:300]
                raise UserError(f"--weights {weights}: not a no-top weights file of {name} "
                                f"({detail})") from None
            _warn_again(held)
            raise
        _warn_again(held)
        outputs = base(x)
    model = keras.Model(inputs, outputs, name=f"backbone_{name}")
    model.trainable = False
    return model


def _warn_again(held: list) -> None:
    """Issues again the warnings `warnings.catch_warnings(record=True)` held back."""
    for w in held:
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def decode_image(image_bytes: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded JPEG/PNG/GIF (first frame)/BMP -> float32 RGB [size, size, 3] in [0, 255].

    Grayscale is expanded and alpha dropped (`channels=3`); the image is resized without
    keeping the aspect ratio, as the backbones were trained.
    """
    image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
    image = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear",
                            antialias=True)
    return tf.clip_by_value(image, 0.0, 255.0)

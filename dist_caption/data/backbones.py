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
| vit                | preset | h x w x c (preset) | the preset's image converter: its scale, offset |
| clip               | preset | h x w x c (preset) | the preset's image converter: its scale, offset |
| siglip             | preset | h x w x c (preset) | the preset's image converter: its scale, offset |

`patches` has no weights: the image is cut into a grid of raw pixel patches (as a ViT sees
it) and the captioner learns the projection, so the embedded default needs no download.

`vit`, `clip` and `siglip` are keras_hub encoders (ViTBackbone, CLIPVisionEncoder,
SigLIPVisionEncoder) loaded from a local preset folder only (`--weights DIR`: nothing is
downloaded here; `fetch_hint` says how to save one with internet). The size is the preset's
(image_shape), h x w its patch grid and c its width: vit_base_patch16_224 gives 14 x 14 x 768.
The patch tokens become the grid and the class token is dropped; `--class_token keep` makes the
grid one row, [1, 1 + h*w, c], the class token first (the captioner's `linear` stem projects
every cell alike; its 2-D positions become 1-D). SigLIP has no class token (keep is refused);
its grid is the tokens before its attention-pooling head.
"""

from __future__ import annotations

import dataclasses
import json
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
    size: int | None  # None: the preset's own (its config's image_shape)
    preprocessing: str  # the `Preprocess` mode, or "preset": its image converter's
    application: str | None  # keras.applications constructor, None for the others
    extra_args: tuple = ()
    # keras_hub: the classes a preset folder's config.json may name, and a preset to fetch
    presets: tuple[str, ...] = ()
    example: str = ""
    class_token: bool = False  # whether the encoder's sequence starts with a class token


BACKBONES = {spec.name: spec for spec in (
    BackboneSpec("patches", 96, "unit", None),
    BackboneSpec("mobilenet_v3_small", 224, "none", "MobileNetV3Small",
                 (("include_preprocessing", True),)),
    BackboneSpec("mobilenet_v3_large", 224, "none", "MobileNetV3Large",
                 (("include_preprocessing", True),)),
    BackboneSpec("efficientnet_b0", 224, "none", "EfficientNetB0"),
    BackboneSpec("inception_v3", 299, "tf", "InceptionV3"),
    BackboneSpec("resnet50", 224, "caffe", "ResNet50"),
    BackboneSpec("vit", None, "preset", None, presets=("ViTBackbone",),
                 example="vit_base_patch16_224_imagenet", class_token=True),
    BackboneSpec("clip", None, "preset", None, presets=("CLIPVisionEncoder", "CLIPBackbone"),
                 example="clip_vit_base_patch16", class_token=True),
    BackboneSpec("siglip", None, "preset", None,
                 presets=("SigLIPVisionEncoder", "SigLIPBackbone"),
                 example="siglip_base_patch16_224"),
)}
if tuple(BACKBONES) != config.BACKBONES:  # the --backbone choices are declared in config.py
    raise ImportError(f"backbones.py has {tuple(BACKBONES)}, config.BACKBONES "
                      f"{config.BACKBONES}: make them agree")
PATCH_SIZE = 12
CLASS_TOKEN_MODES = ("drop", "keep", "none")
# The files of a keras_hub preset folder this package reads.
PRESET_CONFIG, PRESET_CONVERTER = "config.json", "image_converter.json"
PRESET_WEIGHTS = ("model.weights.h5", "model.weights.json")  # whole, or sharded
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


@keras.saving.register_keras_serializable(package="dist_caption")
class Rescale(keras.layers.Layer):
    """x * scale + offset, per channel or for all: a keras_hub preset's image converter's own
    normalisation, from RGB in [0, 255] (its resizing is `decode_image`'s, as for every
    backbone)."""

    def __init__(self, scale=None, offset=None, **kwargs):
        super().__init__(**kwargs)
        self.scale, self.offset = scale, offset

    def call(self, images):
        if self.scale is not None:
            images = images * tf.constant(self.scale, images.dtype)
        if self.offset is not None:
            images = images + tf.constant(self.offset, images.dtype)
        return images

    def get_config(self):
        return {**super().get_config(), "scale": self.scale, "offset": self.offset}


@keras.saving.register_keras_serializable(package="dist_caption")
class TokenGrid(keras.layers.Layer):
    """A transformer encoder's tokens [b, (1 +) h*w, c] -> a grid.

    `class_token` is "drop" ([b, h, w, c], the class token left out), "keep" ([b, 1, 1 + h*w,
    c]: one row of cells, the class token first, then the patches row by row; the 2-D layout
    is given up so the captioner's `linear` stem sees every token as a cell) or "none" (the
    encoder has no class token: [b, h, w, c]).
    """

    def __init__(self, rows: int, cols: int, class_token: str, **kwargs):
        super().__init__(**kwargs)
        if class_token not in CLASS_TOKEN_MODES:
            raise ValueError(f"unknown class_token mode {class_token!r}")
        self.rows, self.cols, self.class_token = rows, cols, class_token

    def call(self, tokens):
        channels = tokens.shape[-1]
        if self.class_token == "keep":
            return tf.reshape(tokens, [-1, 1, 1 + self.rows * self.cols, channels])
        if self.class_token == "drop":
            tokens = tokens[:, 1:]
        return tf.reshape(tokens, [-1, self.rows, self.cols, channels])

    def compute_output_shape(self, input_shape):
        # Not traced: keras_hub 0.32's SigLIP embedding declares one token more than it makes.
        if self.class_token == "keep":
            return (input_shape[0], 1, 1 + self.rows * self.cols, input_shape[-1])
        return (input_shape[0], self.rows, self.cols, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "rows": self.rows, "cols": self.cols,
                "class_token": self.class_token}


def get_spec(name: str) -> BackboneSpec:
    if name not in BACKBONES:
        raise UserError(f"unknown backbone {name!r}: choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


def build_backbone(name: str, weights: str = "imagenet",
                   class_token: str = "drop") -> keras.Model:
    """The frozen backbone `name`, preprocessing included.

    `weights` is 'imagenet' (downloaded by Keras), 'none' (random, for tests and `patches`)
    or the path of a Keras weights file for the model without its classifier top; for a
    keras_hub backbone (vit, clip, siglip) the path of a local preset folder (see
    `load_preset`). `class_token` says what becomes of an encoder's class token (`TokenGrid`).
    """
    spec = get_spec(name)
    check_class_token(name, class_token)
    if spec.presets:
        return assemble_preset(name, *load_preset(name, weights), class_token)
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


def check_class_token(name: str, class_token: str) -> None:
    """Only vit and clip have a class token to keep (siglip, the CNNs and `patches` none)."""
    if class_token == "keep" and not get_spec(name).class_token:
        raise UserError(f"--class_token keep: {name} has no class token (vit and clip have "
                        "one): leave --class_token at drop")


def fetch_hint(name: str, folder: str = "DIR") -> str:
    """How a user with internet saves a real preset of `name` into `folder` (one line)."""
    example = get_spec(name).example
    return (f"with internet, save one with python -c \"import keras_hub as h; "
            f"h.models.Backbone.from_preset('{example}').save_to_preset('{folder}'); "
            f"h.layers.ImageConverter.from_preset('{example}').save_to_preset('{folder}')\"")


def preset_class(folder: str) -> str | None:
    """The class a keras_hub preset folder's config.json names (None: no config.json)."""
    path = os.path.join(folder, PRESET_CONFIG)
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path) as f:
        return json.load(f).get("class_name")


def check_preset(name: str, folder: str, class_token: str = "drop") -> None:
    """Raises a one-line UserError unless `folder` is a whole keras_hub preset of `name`'s
    family, with its image converter, and `class_token` applies to it; reads only its JSON."""
    spec = get_spec(name)
    check_class_token(name, class_token)
    if folder in ("imagenet", "none"):
        raise UserError(f"--backbone {name} needs --weights PRESET_DIR, a local keras_hub "
                        f"preset folder, not {folder} (its weights are not downloaded here); "
                        + fetch_hint(name))
    if not tf.io.gfile.isdir(folder):
        raise UserError(f"--weights {folder}: not a folder; --backbone {name} needs a local "
                        f"keras_hub preset folder; " + fetch_hint(name))
    found = preset_class(folder)
    if found is None:
        raise UserError(f"--weights {folder}: no {PRESET_CONFIG}, so not a keras_hub preset "
                        f"folder; " + fetch_hint(name))
    if found not in spec.presets:
        raise UserError(f"--weights {folder}: a keras_hub preset of {found}, not of {name} "
                        f"({' or '.join(spec.presets)}): pass a {name} preset folder; "
                        + fetch_hint(name))
    if not any(tf.io.gfile.exists(os.path.join(folder, f)) for f in PRESET_WEIGHTS):
        raise UserError(f"--weights {folder}: no {PRESET_WEIGHTS[0]}, an incomplete preset "
                        "folder; " + fetch_hint(name))
    converter_path = os.path.join(folder, PRESET_CONVERTER)
    if not tf.io.gfile.exists(converter_path):
        raise UserError(f"--weights {folder}: no {PRESET_CONVERTER}, so the preset's own "
                        "preprocessing is unknown: save its image converter into the folder, "
                        f"keras_hub.layers.ImageConverter.from_preset('{spec.example}')"
                        f".save_to_preset('{folder}')")
    with tf.io.gfile.GFile(os.path.join(folder, PRESET_CONFIG)) as f:
        encoder = json.load(f)["config"]
    encoder = encoder.get("vision_encoder", {}).get("config", encoder)  # a two-tower preset
    if class_token == "keep" and not encoder.get("use_class_token", True):
        raise UserError(f"--class_token keep: the {name} preset {folder} has no class token "
                        "(use_class_token false): leave --class_token at drop")


def load_preset(name: str, folder: str):
    """(encoder, image converter) of the keras_hub preset `folder`, checked to be of `name`'s
    family (`check_preset`); the vision encoder of a two-tower (CLIP, SigLIP) preset. Weights
    in float32."""
    check_preset(name, folder)
    found = preset_class(folder)
    converter_path = os.path.join(folder, PRESET_CONVERTER)
    import keras_hub  # noqa: F401 (registers its classes for deserialisation)

    with tf.io.gfile.GFile(converter_path) as f:
        converter = keras.saving.deserialize_keras_object(json.load(f))
    try:
        encoder = keras_hub.models.Backbone.from_preset(folder, dtype="float32")
    except Exception as e:  # keras_hub raises many kinds; the first line says what
        detail = " ".join((str(e).strip().splitlines() or [type(e).__name__])[0].split())
        raise UserError(f"--weights {folder}: keras_hub could not load this {found} preset "
                        f"({detail[:300]}); " + fetch_hint(name)) from None
    encoder = getattr(encoder, "vision_encoder", encoder)  # a two-tower preset: its images'
    size = tuple(encoder.image_shape[:2])
    if converter.image_size is not None and tuple(converter.image_size) != size:
        raise UserError(f"--weights {folder}: its image converter resizes to "
                        f"{tuple(converter.image_size)}, its encoder takes {size}: the preset "
                        "is inconsistent; save both from the same preset")
    return encoder, converter


def assemble_preset(name: str, encoder, converter, class_token: str) -> keras.Model:
    """RGB [0, 255] at the encoder's size -> the converter's scale and offset -> the encoder
    -> its tokens as a grid (`TokenGrid`)."""
    height, width = encoder.image_shape[:2]
    patch = encoder.patch_size
    rows, cols = (height // patch[0], width // patch[1]) if isinstance(patch, (tuple, list)) \
        else (height // patch, width // patch)
    has_token = get_spec(name).class_token and getattr(encoder, "use_class_token", True)
    if class_token == "keep" and not has_token:
        raise UserError(f"--class_token keep: this {name} preset has no class token "
                        "(use_class_token false): leave --class_token at drop")
    if name == "siglip":  # its tokens, not the attention-pooled vector of its head
        tokens = encoder.post_layer_norm.output
    else:
        tokens = encoder.output
        tokens = tokens["sequence_output"] if isinstance(tokens, dict) else tokens
    core = keras.Model(encoder.inputs[0], tokens, name=f"{name}_encoder")
    inputs = keras.Input((height, width, 3), dtype="float32", name="images")
    x = Rescale(converter.scale, converter.offset, name="preprocess")(inputs)
    outputs = TokenGrid(rows, cols, class_token if has_token else "none",
                        name="tokens")(core(x))
    model = keras.Model(inputs, outputs, name=f"backbone_{name}")
    model.trainable = False
    return model


def save_preset(encoder, converter, folder: str) -> None:
    """`encoder` and `converter` as a keras_hub preset in the local `folder`."""
    encoder.save_to_preset(folder)
    converter.save_to_preset(folder)


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

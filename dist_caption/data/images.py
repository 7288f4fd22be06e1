"""Checked in-graph decoding of a batch of encoded images, for the exported signatures.

A serving request must never crash or stall the server: each image is checked with cheap header
reads *before* it is decoded, and a bad one fails the whole request with InvalidArgument and a
message naming the image's index and the batch size (`image 3 of 8: ...`), the problem and the
fix:

| problem                      | how it is found                                            |
|------------------------------|------------------------------------------------------------|
| empty                        | zero bytes                                                 |
| not an image                 | no JPEG, PNG, GIF or BMP signature                         |
| truncated                    | JPEG without its end marker, PNG without IEND, GIF without |
|                              | its trailer, BMP shorter than its header says              |
| zero-sized                   | a width or height of 0 in the header                       |
| too many pixels (a "bomb")   | width x height from the header above `max_pixels`          |

Only then is the image decoded (`backbones.decode_image`: RGB, first GIF frame, resized exactly
as feature extraction resized it). Damage deeper inside the compressed data is reported by
TensorFlow's own decoder, still as InvalidArgument, but without the index.
"""

from __future__ import annotations

import tensorflow as tf

from dist_caption import config
from dist_caption.data.backbones import decode_image

MAX_PIXELS = config.MAX_PIXELS  # default limit per image: a 40-megapixel photo, ~120 MB decoded
MAX_BATCH = config.MAX_BATCH  # default limit of images per request

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_HEADER_PAD = b"\0" * 32  # header reads on short inputs read zeros instead of failing


def _substr(data: tf.Tensor, start, count: int) -> tf.Tensor:
    """`count` bytes of each string from `start` (an int, or one position per string)."""
    if isinstance(start, tf.Tensor):
        return tf.strings.substr(data, start, tf.fill(tf.shape(start), tf.constant(count,
                                                                                  start.dtype)))
    return tf.strings.substr(data, start, count)


def _bytes_at(data: tf.Tensor, start, count: int) -> tf.Tensor:
    """int64 [B, count]: bytes start..start+count of each (zero-padded) string in `data`."""
    return tf.cast(tf.io.decode_raw(_substr(data, start, count), tf.uint8), tf.int64)


def _number(data: tf.Tensor, start: int, count: int, big_endian: bool) -> tf.Tensor:
    """int64 [B]: the unsigned integer stored at bytes start..start+count of each string."""
    digits = _bytes_at(data, start, count)
    if big_endian:
        digits = digits[:, ::-1]
    return tf.reduce_sum(digits * (256 ** tf.range(count, dtype=tf.int64)), axis=1)


def _check(ok: tf.Tensor, problem: str, *values: tf.Tensor) -> tf.Operation:
    """Fails with `image <first failing index> of <batch size>: problem` unless every entry of
    `ok` holds. The size tells a client whether the index is into its own request or into a
    batch that the server's batching merged it into."""
    first = tf.argmin(tf.cast(ok, tf.int32), output_type=tf.int64)
    return tf.debugging.Assert(tf.reduce_all(ok), [tf.strings.format(
        "image {} of {}: " + problem,
        (first, tf.size(ok), *(tf.gather(v, first) for v in values)))])


def _pixel_problem(max_pixels: int) -> str:
    return (f"is {{}}x{{}} = {{}} pixels, above the limit of {max_pixels}; "
            "downscale it before sending")


def _header_checks(image_bytes: tf.Tensor, max_pixels: int) -> tuple[list, tf.Tensor]:
    """The batch-wide checks, in order, and which images are JPEGs (sized while decoding)."""
    length = tf.cast(tf.strings.length(image_bytes), tf.int64)
    data = image_bytes + _HEADER_PAD  # header reads on short inputs read zeros
    head = tf.strings.substr(data, 0, 8)
    is_jpeg = tf.strings.substr(head, 0, 3) == b"\xff\xd8\xff"
    is_png = head == _PNG_SIGNATURE
    is_gif = tf.logical_or(tf.strings.substr(head, 0, 6) == b"GIF87a",
                           tf.strings.substr(head, 0, 6) == b"GIF89a")
    is_bmp = tf.strings.substr(head, 0, 2) == b"BM"
    known = is_jpeg | is_png | is_gif | is_bmp

    tail = _bytes_at(data, tf.maximum(length - 32, 0), 32)  # some JPEG encoders pad after FF D9
    jpeg_end = tf.reduce_any((tail[:, :-1] == 0xFF) & (tail[:, 1:] == 0xD9), axis=1)
    last = _substr(data, tf.maximum(length - 8, 0), 8)
    complete = tf.where(is_jpeg, jpeg_end, tf.where(
        is_png, last == _PNG_END, tf.where(
            is_gif, tf.strings.substr(last, 7, 1) == b";",
            _number(data, 2, 4, big_endian=False) <= length)))

    bmp_height = _number(data, 22, 4, big_endian=False)
    bmp_height = tf.abs(tf.where(bmp_height >= 2 ** 31, bmp_height - 2 ** 32, bmp_height))
    width = tf.where(is_png, _number(data, 16, 4, True), tf.where(
        is_gif, _number(data, 6, 2, False), _number(data, 18, 4, False)))
    height = tf.where(is_png, _number(data, 20, 4, True), tf.where(
        is_gif, _number(data, 8, 2, False), bmp_height))
    sized = is_jpeg | ((width > 0) & (height > 0))
    small = is_jpeg | (width * height <= max_pixels)

    checks = []
    for ok, problem, values in (
            (length > 0, "is empty (0 bytes); send the file contents", ()),
            (known, "is not a JPEG, PNG, GIF or BMP image; convert it to JPEG or PNG", ()),
            (complete, "is truncated (its end is missing); send the whole file", ()),
            (sized, "has a zero width or height; send a real picture", ()),
            (small, _pixel_problem(max_pixels), (width, height, width * height))):
        with tf.control_dependencies(checks[-1:]):
            checks.append(_check(ok, problem, *values))
    return checks, is_jpeg


def _decode_one(image_bytes: tf.Tensor, index: tf.Tensor, is_jpeg: tf.Tensor, count: tf.Tensor,
                size: int, max_pixels: int) -> tf.Tensor:
    """One checked image decoded; a JPEG's size is read from its header here, first."""
    def jpeg_small_enough():
        height, width = tf.unstack(tf.cast(tf.io.extract_jpeg_shape(image_bytes)[:2], tf.int64))
        ok = tf.debugging.Assert(height * width <= max_pixels, [tf.strings.format(
            "image {} of {}: " + _pixel_problem(max_pixels),
            (index, count, width, height, width * height))])
        with tf.control_dependencies([ok]):
            return tf.constant(True)

    checked = tf.cond(is_jpeg, jpeg_small_enough, lambda: tf.constant(True))
    with tf.control_dependencies([checked]):
        return decode_image(image_bytes, size)


def decode_batch(image_bytes: tf.Tensor, size: int, max_pixels: int = MAX_PIXELS,
                 max_batch: int = MAX_BATCH) -> tf.Tensor:
    """tf.string [batch] of encoded images -> float32 RGB [batch, size, size, 3] in [0, 255].

    Images may differ in size and format. Raises InvalidArgument (see the module docstring)
    for an empty batch, more than `max_batch` images, or a bad image.
    """
    image_bytes = tf.convert_to_tensor(image_bytes, tf.string)
    count = tf.size(image_bytes)
    batch_ok = tf.debugging.Assert(
        tf.logical_and(count > 0, count <= max_batch),
        [tf.strings.format("the request holds {} images; send between 1 and " + str(max_batch)
                           + " per request", count)])
    with tf.control_dependencies([batch_ok]):
        checks, is_jpeg = _header_checks(image_bytes, max_pixels)
    with tf.control_dependencies(checks):
        indices = tf.range(count, dtype=tf.int64)
    return tf.map_fn(lambda args: _decode_one(*args, count, size, max_pixels),
                     (image_bytes, indices, is_jpeg),
                     fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))

"""Checked in-graph decoding of a batch of encoded images, for the exported signatures.

A serving request must never crash or stall the server: each image is checked with cheap header
reads *before* it is decoded, and a bad one fails the whole request with InvalidArgument and a
message naming the image's index, the problem and the fix:

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

from dist_caption.data.backbones import decode_image

MAX_PIXELS = 40_000_000  # default limit per image: a 40-megapixel photo, ~120 MB decoded
MAX_BATCH = 64  # default limit of images per request

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = b"IEND\xaeB`\x82"
_HEADER_PAD = b"\0" * 32  # header reads on short inputs read zeros instead of failing


def _bytes_at(data: tf.Tensor, start: int, count: int) -> tf.Tensor:
    """int64 [count]: bytes start..start+count of (zero-padded) `data`."""
    return tf.cast(tf.io.decode_raw(tf.strings.substr(data, start, count), tf.uint8), tf.int64)


def _number(data: tf.Tensor, start: int, count: int, big_endian: bool) -> tf.Tensor:
    digits = _bytes_at(data, start, count)
    if big_endian:
        digits = digits[::-1]
    return tf.reduce_sum(digits * (256 ** tf.range(count, dtype=tf.int64)))


def _signed32(value: tf.Tensor) -> tf.Tensor:
    return tf.where(value >= 2 ** 31, value - 2 ** 32, value)


def _has_jpeg_end(data: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
    """An FF D9 end marker within the last 32 bytes (some encoders pad after it)."""
    tail = tf.io.decode_raw(
        tf.strings.substr(data + _HEADER_PAD, tf.maximum(length - 32, 0), 32), tf.uint8)
    return tf.reduce_any(tf.logical_and(tail[:-1] == 0xFF, tail[1:] == 0xD9))


def _check(condition: tf.Tensor, index: tf.Tensor, problem: str) -> tf.Operation:
    return tf.debugging.Assert(condition, [tf.strings.format("image {}: " + problem, index)])


def _checked_decode(image_bytes: tf.Tensor, index: tf.Tensor, size: int,
                    max_pixels: int) -> tf.Tensor:
    length = tf.strings.length(image_bytes)
    data = image_bytes + _HEADER_PAD
    head = tf.strings.substr(data, 0, 8)
    is_jpeg = tf.strings.substr(head, 0, 3) == b"\xff\xd8\xff"
    is_png = head == _PNG_SIGNATURE
    is_gif = tf.logical_or(tf.strings.substr(head, 0, 6) == b"GIF87a",
                           tf.strings.substr(head, 0, 6) == b"GIF89a")
    is_bmp = tf.strings.substr(head, 0, 2) == b"BM"
    last = tf.strings.substr(data, tf.maximum(length - 8, 0), 8)

    not_empty = _check(length > 0, index, "is empty (0 bytes); send the file contents")
    with tf.control_dependencies([not_empty]):
        known = _check(tf.reduce_any([is_jpeg, is_png, is_gif, is_bmp]), index,
                       "is not a JPEG, PNG, GIF or BMP image; convert it to JPEG or PNG")
    with tf.control_dependencies([known]):
        complete = tf.case([
            (is_jpeg, lambda: _has_jpeg_end(image_bytes, length)),
            (is_png, lambda: last == _PNG_END),
            (is_gif, lambda: tf.strings.substr(last, 7, 1) == b";"),
        ], default=lambda: _number(data, 2, 4, big_endian=False) <= tf.cast(length, tf.int64))
        whole = _check(complete, index, "is truncated (its end is missing); send the whole file")
    with tf.control_dependencies([whole]):
        height, width = tf.case([
            (is_jpeg, lambda: tf.unstack(tf.cast(tf.io.extract_jpeg_shape(image_bytes)[:2],
                                                 tf.int64))),
            (is_png, lambda: [_number(data, 20, 4, True), _number(data, 16, 4, True)]),
            (is_gif, lambda: [_number(data, 8, 2, False), _number(data, 6, 2, False)]),
        ], default=lambda: [tf.abs(_signed32(_number(data, 22, 4, False))),
                            _number(data, 18, 4, False)])
        sized = _check(tf.logical_and(height > 0, width > 0), index,
                       "has a zero width or height; send a real picture")
    with tf.control_dependencies([sized]):
        pixels_ok = tf.debugging.Assert(height * width <= max_pixels, [tf.strings.format(
            "image {}: is {}x{} = {} pixels, above the limit of " + str(max_pixels)
            + "; downscale it before sending", (index, width, height, width * height))])
    with tf.control_dependencies([pixels_ok]):
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
        indices = tf.range(count, dtype=tf.int64)
    return tf.map_fn(lambda args: _checked_decode(args[0], args[1], size, max_pixels),
                     (image_bytes, indices),
                     fn_output_signature=tf.TensorSpec([size, size, 3], tf.float32))

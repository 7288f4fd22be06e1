"""`traced`: how the library turns Python into TensorFlow graphs.

The library's traced code spells its control flow (`tf.cond`, `tf.while_loop`), so it is
traced without autograph: autograph would only re-read each function's source at its first
trace (part of every command's start-up).

>>> int(traced(lambda x: x + 1)(tf.constant(1)))
2
"""

from __future__ import annotations

import functools

import tensorflow as tf

traced = functools.partial(tf.function, autograph=False)

"""dist_caption: image captioning trained with tf.distribute and served by TensorFlow Serving."""

import os

# Fewer of TensorFlow's C++ start-up notices (errors still show); set before any module imports
# TensorFlow. Those logged before absl is initialised ignore it: dist_caption/console.py keeps
# them out of the launcher's and the quickstart's console output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

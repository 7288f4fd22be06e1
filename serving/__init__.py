"""Serving: the TensorFlow Serving client and the local stand-in server. Nothing here imports
`dist_caption`: serving works with any export that follows the signature contract."""

import os

# Fewer of TensorFlow's C++ start-up notices (errors still show); see dist_caption/__init__.py.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

DEFAULT_MODEL_NAME = "caption"  # the name the export's warm-up requests and the server use

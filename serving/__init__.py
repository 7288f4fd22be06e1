"""Serving: the TensorFlow Serving client and the local stand-in server. Nothing here imports
`dist_caption`: serving works with any export that follows the signature contract."""

DEFAULT_MODEL_NAME = "caption"  # the name the export's warm-up requests and the server use

"""Deployment: the model registry and promotion (`registry`), ONNX/TFLite export (`export`) and pulling a version for serving (`pull`)."""

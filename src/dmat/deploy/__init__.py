"""Deployment side: ONNX export checks and serving. Nothing here imports torch at module level."""

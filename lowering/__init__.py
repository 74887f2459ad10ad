"""IR -> ONNX."""

"""Torch model -> verified ONNX graph: export and fuse (onnx), quantize (quantize), check (verify)."""

"""ONNX export of encoders and decoder LMs, and the ONNX Runtime runners."""

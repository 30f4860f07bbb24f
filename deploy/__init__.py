"""Deploy stage: ONNX export, accuracy parity, serving, latency benchmark and CI gates."""

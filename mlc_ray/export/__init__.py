"""Export of a trained tagger to ONNX fp32/int8 and ncnn, with parity checks."""

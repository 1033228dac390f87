"""Export predictors to ONNX, TensorRT engines and Triton repositories, each with a verified manifest."""

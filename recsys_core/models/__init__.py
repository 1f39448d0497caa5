"""The models and where they run: the text encoder (ONNX), its export, the user
tower, the review classifier, model directories, Triton clients, the Triton
Python backend and a local Triton server."""

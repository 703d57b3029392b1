"""Model loading (hub, local directory, GGUF, tiny random models) and generic decoder-block discovery."""

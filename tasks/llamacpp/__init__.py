"""llama.cpp and GGUF: the pinned tooling in tunepipe's cache, conversion, quantization, and checks of a GGUF
against the transformers model it came from. Shared by the export stage and serving (lm-library layer)."""

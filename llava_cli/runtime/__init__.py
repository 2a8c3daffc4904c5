"""The engine: ggml bindings, the vision graph, the text model and its context, the sequence scheduler,
conversations and the image-embedding cache."""

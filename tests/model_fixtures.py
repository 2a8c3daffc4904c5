"""Session-scoped fixtures: synthetic llava-hf checkpoints and the GGUF pairs converted from them."""

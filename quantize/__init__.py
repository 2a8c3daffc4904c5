"""The converter and quantizer: Hugging Face LLaVA checkpoint -> text GGUF + mmproj GGUF."""

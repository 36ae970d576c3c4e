"""lorakit: LoRA fine-tuning and inference directly on quantized GGUF llama models."""

__version__ = "0.1.0"

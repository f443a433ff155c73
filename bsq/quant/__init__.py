"""Bit-plane quantization: straight-through estimators, pure bit-plane arithmetic, layers and model conversion."""

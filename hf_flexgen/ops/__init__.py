"""Pure tensor maths: attention variants and group-wise quantization."""

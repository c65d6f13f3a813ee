"""On-device inference: INT4 engine with a fused MoE, generation and chat, and `mobilemoe bench`."""

"""probllm: from a general open LLM to an evaluated, quantized helper for science multiple-choice questions."""

__version__ = "0.1.0"

"""The evaluate family: MCQ accuracy (`eval`), quantized model folders (`quantize`), the ablation table (`report`)."""

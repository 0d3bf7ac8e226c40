"""Making a trained model smaller: quantization (`quant`), pruning masks and structured pruning
(`prune`), fake quantization for QAT (`qat`), and the before/after report (`report`)."""

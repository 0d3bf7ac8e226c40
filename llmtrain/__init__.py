"""llmtrain: pretrain, fine-tune and evaluate transformer language models from composable configs."""

__version__ = "0.1.0"

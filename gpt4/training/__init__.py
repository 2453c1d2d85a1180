"""Self-supervised training: tokenizer training, data preparation, pretraining, fine-tuning (SFT, LoRA).

The model class is used unmodified; parallelism (DDP / FSDP) wraps it from gpt4.training.distributed.
"""

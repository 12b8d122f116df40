"""Hugging Face PEFT adapter folders: LoRA, IA3 and prompt learning (prefix and prompt tuning)."""

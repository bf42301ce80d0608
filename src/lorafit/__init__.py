"""lorafit: LoRA and QLoRA fine-tuning of small causal language models.

Importing this package does nothing but define the version: commands import what they need.
"""
__version__ = "0.1.0"

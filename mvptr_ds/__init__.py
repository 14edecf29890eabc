"""mvptr_ds: MVPTR vision-language pre-training and fine-tuning on DeepSpeed."""
__version__ = "0.1.0"

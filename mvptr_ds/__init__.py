"""mvptr_ds: MVPTR vision-language pre-training and fine-tuning on DeepSpeed."""
__version__ = "0.1.0"


def encode(checkpoint, *args, **kwargs):
    """Uni-modal and cross-modal representations of image-caption pairs from a checkpoint.

    See :func:`mvptr_ds.evaluation.encode.encode` (imported on first use, so ``import mvptr_ds`` stays cheap).
    """
    from mvptr_ds.evaluation.encode import encode as _encode

    return _encode(checkpoint, *args, **kwargs)

"""mvptr_ds: MVPTR vision-language pre-training and fine-tuning on DeepSpeed."""
from mvptr_ds.version import __version__

__all__ = ["__version__", "encode", "from_pretrained"]


def encode(checkpoint, *args, **kwargs):
    """Uni-modal and cross-modal representations of image-caption pairs from a checkpoint.

    See :func:`mvptr_ds.evaluation.encode.encode` (imported on first use, so ``import mvptr_ds`` stays cheap).
    """
    from mvptr_ds.evaluation.encode import encode as _encode

    return _encode(checkpoint, *args, **kwargs)


def from_pretrained(path, device="cpu"):
    """A trained model in one line: ``model = mvptr_ds.from_pretrained("runs/demo_stage2/final")``.

    ``path``: a ``final/`` folder, a run folder or a DeepSpeed checkpoint. Returns the backbone and ITM head in
    eval mode, the config, and the folder's tokenizer and concept vocabulary (see
    :func:`mvptr_ds.evaluation.loading.from_pretrained`).
    """
    from mvptr_ds.evaluation.loading import from_pretrained as _from_pretrained

    return _from_pretrained(path, device)

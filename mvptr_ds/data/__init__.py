"""Data: records, readers of the real formats, the feature store, the synthetic world, corruption, batching.

Names are resolved lazily so that ``import mvptr_ds.data`` stays cheap.
"""
_EXPORTS = {
    "Example": "types", "Batch": "types",
    "FeatureStore": "feature_store", "TsvFeatureStore": "feature_store", "open_feature_store": "feature_store",
    "convert_features": "feature_store",
    "DataError": "readers",
    "RealDataset": "real_dataset",
    "SceneWorld": "synthetic",
    "VocabInfo": "vocab",
    "Collator": "batching", "ResumableLoader": "batching",
    "DataBundle": "pipeline", "build_data": "pipeline",
}


def __getattr__(name):
    if name in _EXPORTS:
        import importlib
        return getattr(importlib.import_module(f"mvptr_ds.data.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mvptr_ds.data' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)

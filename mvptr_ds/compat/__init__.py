"""Conversion from and to the authors' checkpoint format (MVPTR.md section 6)."""
from mvptr_ds.compat.authors_ckpt import (ConversionReport, authors_config_from, authors_to_project,
                                          convert_original, original_outputs, project_to_authors, write_original)

__all__ = ["original_outputs", "convert_original", "authors_to_project", "project_to_authors",
           "authors_config_from", "ConversionReport", "write_original"]

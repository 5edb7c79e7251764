"""Checkpoint converters: Hugging Face, Meta original and llama2.c in; Hugging Face out."""

from convert.errors import ConversionError
from convert.export import export_hf
from convert.importer import import_checkpoint, load

__all__ = ["ConversionError", "export_hf", "import_checkpoint", "load"]

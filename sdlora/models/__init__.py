"""Base models: loading (hub id, diffusers folder, single file), tokenizer, tiny and demo models."""

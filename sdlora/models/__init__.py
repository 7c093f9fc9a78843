"""Base models: loading (hub id, diffusers folder, single file, the bundled demo model), tokenizer, tiny models."""

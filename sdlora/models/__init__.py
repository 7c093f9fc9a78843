"""Base models (SD 1.x, SD 2.x, SDXL): loading (hub id, diffusers folder, single file), shipped
configs (:mod:`.shipped`), the diffusers <-> original UNet names (:mod:`.unet_names`),
tokenizers, tiny and demo models."""

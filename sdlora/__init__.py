"""sdlora: train style LoRAs for Stable Diffusion and export files that other SD tools load."""

__version__ = "0.1.0"

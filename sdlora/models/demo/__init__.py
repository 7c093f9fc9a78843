"""The bundled demo base model: a synthetic world of captioned shapes, its training and its metrics."""

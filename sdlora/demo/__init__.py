"""The demo world: a synthetic world of captioned shapes (renderer, style sets, metrics) and the
from-scratch trainer of the bundled demo base model. Loading that model is :mod:`sdlora.models.loading`'s
job (base model ``"demo"``); this package is how it was made and how LoRAs on it are measured."""

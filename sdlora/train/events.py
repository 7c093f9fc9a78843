"""Typed training events: the API of a training run.

``train(config, callbacks=[...])`` calls every callback with each event; the run also appends
each event as one JSON object a line to ``run_dir/events.jsonl``, which the CLI and the web app
read. Nothing in ``sdlora.train`` prints to stdout as its API.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator


@dataclass
class Event:
    type: str = field(init=False, default="event")
    time: float = field(init=False, default_factory=time.time)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class Start(Event):
    run_dir: str
    total_steps: int
    start_step: int
    num_images: int
    num_train_items: int
    device: str
    precision: str
    trainable_params: int
    resumed: bool = False

    def __post_init__(self):
        self.type = "start"


@dataclass
class Step(Event):
    step: int
    total_steps: int
    loss: float
    lr: float
    it_per_s: float
    eta_s: float
    loss_prior: float | None = None
    mfu: float | None = None
    epoch: int = 0

    def __post_init__(self):
        self.type = "step"


@dataclass
class Sample(Event):
    step: int
    paths: list[str]
    prompts: list[str]

    def __post_init__(self):
        self.type = "sample"


@dataclass
class Checkpoint(Event):
    step: int
    path: str

    def __post_init__(self):
        self.type = "checkpoint"


@dataclass
class Message(Event):
    """Progress of a preparation phase (loading, caching, class images)."""

    text: str
    done: int = 0
    total: int = 0

    def __post_init__(self):
        self.type = "message"


@dataclass
class Warning_(Event):
    text: str

    def __post_init__(self):
        self.type = "warning"


@dataclass
class Done(Event):
    step: int
    lora_path: str
    seconds: float
    processes: int = 1
    adapter_digests: list[str] = field(default_factory=list)

    def __post_init__(self):
        self.type = "done"


@dataclass
class Stopped(Event):
    step: int
    checkpoint: str | None

    def __post_init__(self):
        self.type = "stopped"


@dataclass
class Failed(Event):
    step: int
    error: str

    def __post_init__(self):
        self.type = "failed"


Callback = Callable[[Event], None]


class EventLog:
    """Appends events to ``events.jsonl`` (one line each, flushed) and forwards them to callbacks."""

    def __init__(self, path: str | Path | None, callbacks: list[Callback] | None = None, *, enabled: bool = True):
        self.path = Path(path) if path else None
        self.callbacks = list(callbacks or [])
        self.enabled = enabled
        if self.path and enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: Event) -> None:
        if not self.enabled:
            return
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event.to_dict()) + "\n")
        for cb in self.callbacks:
            cb(event)


def read_events(path: str | Path, types: set[str] | None = None) -> Iterator[dict[str, Any]]:
    """Read events back; a partly written last line (a run still writing) is skipped."""
    p = Path(path)
    if not p.exists():
        return
    with open(p, encoding="utf-8") as f:
        for line in f:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                continue
            if types is None or ev.get("type") in types:
                yield ev

"""Bundled reference models (``tiecheck.models``), built on the meta device.

The meta device keeps ties (``with torch.device("meta")`` assigns the same Parameter) and
allocates nothing, so even ``big-vocab`` is analysed in milliseconds.
"""

from __future__ import annotations

from tiecheck import models
from tiecheck.facts import Source
from tiecheck.loaders.subject import Subject
from tiecheck.loaders.tensor_facts import module_tensors


def names() -> list[str]:
    return [p.name for p in models.list_presets()]


def is_bundled(name: str) -> bool:
    return name in models.PRESETS


def load_bundled(name: str, tied: bool = True) -> Subject:
    module = models.build(name, tied=tied, device="meta")
    preset = models.get_preset(name)
    return Subject(tensors=module_tensors(module), module=module,
                   source=Source(target=name, format="bundled model",
                                 notes=[preset.description, "built on the meta device: no weights allocated"]))

"""The one thing every loader returns, whatever the target's format."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tiecheck.facts import Source

if TYPE_CHECKING:  # pragma: no cover
    import torch
    from torch import nn


@dataclass
class Subject:
    """Named tensors to analyse, with the live module when the target yields one.

    ``tensors`` maps every name (parameters and buffers, duplicates included) to its tensor,
    in the order the target lists them. For a module, the names are those of
    ``named_parameters(remove_duplicate=False)`` followed by buffers, so a tie shows up as
    several names for one Parameter object.
    """

    tensors: dict[str, torch.Tensor]
    source: Source
    module: nn.Module | None = None
    config: dict[str, Any] | None = None
    # Extra findings a loader discovered (e.g. keys absent from a file because they are tied).
    loader_findings: list[Any] = field(default_factory=list)
    # Free-form facts a loader wants in the report (e.g. which files were read).
    extra: dict[str, Any] = field(default_factory=dict)
    # File offsets of memory-mapped tensors (name -> fileview.FileSpan), for reading content with pread.
    file_spans: Mapping[str, Any] = field(default_factory=dict)
    # A module built from a config (e.g. a Hugging Face folder's architecture, on the meta device)
    # for what needs a module but not its tensors, such as FLOPs. The tensors still come from the
    # files, so facts and memory are the files'; ``module`` stays None.
    architecture: nn.Module | None = None
    # Ties as the target declares them (``loaders/declared.py``): every declaration with its origin,
    # and the name pairs they declare tied or untied.
    declarations: list[dict[str, Any]] = field(default_factory=list)
    declared_pairs: list[dict[str, Any]] = field(default_factory=list)
    # The stored layer: name -> identity of the bytes the files hold for it (None: not in the files).
    # Left None where the subject's tensors are the files' own (their memory is the stored layer)
    # or where there are no files (a live module).
    stored_copies: dict[str, Any] | None = None
    # The whole object a torch.save file holds, as torch.load returns it (weights only, memory-mapped),
    # where the loader read it so (``load_path(..., whole=True)``): what ``tiecheck fix`` saves again.
    checkpoint: Any = None

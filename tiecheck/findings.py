"""Findings: problems and observations with stable codes, a severity, a message and a fix hint.

Codes never change meaning once released; new rules take new codes. The catalogue below is
the single source for the README's rule table and for `--fail-on`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

SEVERITIES = ("error", "warning", "info")
SEVERITY_RANK = {"error": 2, "warning": 1, "info": 0}


@dataclass(frozen=True)
class Rule:
    code: str
    name: str
    severity: str
    summary: str
    hint: str


RULES: dict[str, Rule] = {
    r.code: r
    for r in [
        Rule("TC001", "linear-shape-mismatch", "error",
             "An nn.Linear's weight or bias disagrees with its declared in/out features or with each other.",
             "Build the output projection as nn.Linear(d_model, vocab_size) so weight is (vocab_size, d_model) "
             "like the embedding, and give it bias=False or a bias of shape (vocab_size,)."),
        Rule("TC002", "distinct-parameters-alias", "error",
             "Distinct Parameter objects share memory: their gradients are not shared and the optimizer "
             "updates the same memory once per Parameter.",
             "Tie by assigning the Parameter itself (`head.weight = emb.weight`), not a new nn.Parameter "
             "over the same data; after `load_state_dict(assign=True)`, re-tie with `model.tie_weights()` or "
             "assign the Parameter again."),
        Rule("TC003", "partial-overlap", "error",
             "Tensors overlap in memory without being the same view: writing one silently changes part of another.",
             "Give each tensor its own memory (`.clone()`), or make them the same view if a tie was meant."),
        Rule("TC004", "tie-spans-devices", "warning",
             "A tied tensor is used by modules whose other tensors live on another device.",
             "Place tied modules on one device (e.g. keep the embedding and the output head together), "
             "or untie deliberately."),
        Rule("TC005", "untied-duplicate", "warning",
             "Tensors have equal dtype, shape and content but separate memory: a broken tie or a wasted copy "
             "(an error where the architecture ties them: an input embedding and its output projection).",
             "Re-tie after loading (`model.tie_weights()`, or assign the Parameter again after "
             "`load_state_dict(assign=True)`), or drop the copy."),
        Rule("TC006", "tie-candidate", "info",
             "Untied tensors could be tied (embedding and output projection, or two embeddings, of equal shape).",
             "Tie them if the architecture allows (`head.weight = emb.weight`); see the bytes it would save."),
        Rule("TC007", "nested-view", "info",
             "A tensor is a view inside another listed tensor (e.g. a flat buffer and its parameter views).",
             "Nothing to do if this is a flat-parameter layout; such views are not ties."),
        Rule("TC008", "restrided-alias", "info",
             "Names share the same memory through different shapes or strides (e.g. a transposed alias).",
             "Fine if intended (a tied output projection stored as E.T); check the consumer reads it that way."),
        Rule("TC009", "expected-tie-missing", "error",
             "Names that were expected to be tied do not share memory.",
             "Re-tie them (`model.tie_weights()` or assign the Parameter), or update the expectation."),
        Rule("TC010", "tied-key-stored-twice", "warning",
             "A checkpoint stores both names of a tie with different content: one copy will silently win on load.",
             "Save with the tie intact (one copy), or decide which copy is right and drop the other."),
        Rule("TC011", "config-tie-mismatch", "warning",
             "The config's tie setting disagrees with what the architecture or the files do.",
             "Make `tie_word_embeddings` match the weights you ship, or re-export the checkpoint."),
        Rule("TC012", "tied-key-absent", "info",
             "A key is absent from the files because it is tied to one that is stored.",
             "Nothing to do: the architecture re-ties it on load."),
        Rule("TC013", "unexpected-tie", "error",
             "Names share memory that an expectation (a snapshot, or a not-tied rule) says should not.",
             "If the new tie is intended, update the expectation (`pytest --tiecheck-update`, "
             "`tiecheck check --update`); otherwise find where the model assigns one Parameter to both names."),
        Rule("TC014", "tie-kind-changed", "error",
             "A tie group holds the expected names but is of another kind than expected (e.g. one Parameter "
             "became distinct Parameters over one memory).",
             "Tie by assigning the Parameter itself (`head.weight = emb.weight`), or update the expectation "
             "if the new kind is intended."),
        Rule("TC015", "declared-tie-contradicted", "error",
             "A declaration says names are tied, but the files (or memory) hold them with different content: "
             "whichever copy a loader keeps, some consumer of the model gets the wrong weights.",
             "Decide which copy is right: if the head was trained or merged on purpose, set "
             "`tie_word_embeddings=false` (or drop the alias); otherwise save with the tie intact."),
        Rule("TC016", "declared-tie-stored-twice", "warning",
             "A declaration says names are tied and both are held as equal copies: the copy is wasted bytes.",
             "Save with the tie intact (`save_pretrained`, `safetensors.torch.save_model`) so one copy is stored."),
        Rule("TC017", "declared-untied-one-copy", "error",
             "A declaration says names are not tied, but only one of them is stored: loaders that trust the "
             "declaration initialise the other randomly.",
             "Set the declaration to tied (e.g. `tie_word_embeddings=true`) if the missing tensor is meant to be the "
             "stored one, or store the missing tensor."),
        Rule("TC018", "declared-untied-but-shared", "warning",
             "A declaration says names are not tied, but they share memory: a loader that trusts the declaration "
             "builds two tensors and loads one copy into each, or leaves one missing.",
             "Make the declaration say tied (e.g. `tie_word_embeddings=true`), or untie in code (`.clone()`)."),
        Rule("TC019", "declarations-disagree", "warning",
             "Two declarations about the same tie disagree (e.g. top-level `tie_word_embeddings` and "
             "`text_config.tie_word_embeddings`): loaders that read a different one build a different model.",
             "Write the same value everywhere the setting appears."),
        Rule("TC020", "alias-map-broken", "warning",
             "A safetensors `__metadata__` alias map names a tensor the file does not hold.",
             "Re-save with `safetensors.torch.save_model`, or remove the stale entry from `__metadata__`."),
        Rule("TC021", "unreachable-bytes", "warning",
             "A stored tensor's storage holds bytes no name reaches (a view saved alone: torch.save writes the "
             "whole storage).",
             "Save a copy of the view (`t.clone()` or `t.contiguous().clone()`) instead of the view itself."),
        Rule("TC022", "packed-head-copy", "info",
             "An input embedding and an output projection of one logical shape are stored in different formats "
             "(a quantized or packed head beside a bf16 embedding): if the model is tied, the head is the "
             "embedding stored again, and quantization broke the tie. Values in different formats are not compared.",
             "If the model is tied, keep the head out of quantization (bitsandbytes `llm_int8_skip_modules=[\"lm_head\"]`, "
             "llama.cpp: drop output.weight so the embedding is used) and save with the tie intact; if it is untied "
             "on purpose, nothing to do."),
        Rule("TC023", "adapter-touches-tie", "warning",
             "A PEFT adapter saves or trains one side of a tie of its base model (e.g. `lm_head` in "
             "`modules_to_save` while the head is the embedding): an independent copy that a merge puts in the "
             "model, or a LoRA delta that a merge adds to both sides.",
             "Train with `ensure_weight_tying=True` (peft ties the adapter's copies again), untie the base on "
             "purpose (`tie_word_embeddings=False`) and save the merged model with that flag, or leave the tied "
             "module out of the adapter."),
        Rule("TC024", "adapter-module-missing", "error",
             "A PEFT adapter config names a module that the adapter (or, with --base, the base model) does not "
             "have: peft refuses to load it.",
             "Fix the module name in adapter_config.json, or re-save the adapter with peft."),
        Rule("TC025", "tie-straddles-fsdp-units", "error",
             "A module already wrapped with FSDP2 `fully_shard`: one tied Parameter is managed by two units, "
             "so each holds its own shards (torch 2.13 refuses it at the first forward; torch 2.11 trains the copies "
             "apart without an error).",
             "Shard the modules that hold the tie in one `fully_shard([a, b])` call, or leave them to the root "
             "unit; `tiecheck plan` checks a plan before launch."),
    ]
}


@dataclass(frozen=True)
class Finding:
    """One finding of a report: a rule's code, how severe it is here, what was found and what to do.

    ``data`` holds what the analysis measured for the finding's own use (bytes, say); it is not part
    of the report's JSON, nor of a finding's equality. ``ignored_by`` is the ignore spec that matched
    it (``TC005:*.rotary_emb.*``): an ignored finding stays in the report and never fails a check.
    """

    code: str
    severity: str
    message: str
    names: tuple[str, ...] = ()
    hint: str = ""
    data: dict[str, Any] = field(default_factory=dict, compare=False)
    ignored_by: str | None = None

    @property
    def rule(self) -> str:
        """The rule's name (``untied-duplicate``), or the code of a rule this release does not know."""
        return RULES[self.code].name if self.code in RULES else self.code

    @property
    def ignored(self) -> bool:
        return self.ignored_by is not None

    def to_dict(self) -> dict[str, Any]:
        d = {"code": self.code, "rule": self.rule, "severity": self.severity, "message": self.message,
             "names": list(self.names), "hint": self.hint}
        if self.ignored_by is not None:
            d.update(ignored=True, ignored_by=self.ignored_by)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Finding:
        return cls(code=d["code"], severity=d["severity"], message=d["message"], names=tuple(d.get("names", ())),
                   hint=d.get("hint", ""), ignored_by=d.get("ignored_by") if d.get("ignored") else None)


@dataclass(frozen=True)
class SeverityCounts:
    """How many findings of each severity a report holds, ignored ones left out (``summary.findings``)."""

    error: int = 0
    warning: int = 0
    info: int = 0

    @classmethod
    def of(cls, findings: Iterable[Finding]) -> SeverityCounts:
        counts = Counter(f.severity for f in findings if not f.ignored)
        return cls(**{s: counts[s] for s in SEVERITIES})

    def to_dict(self) -> dict[str, int]:
        return {s: getattr(self, s) for s in SEVERITIES}

    @classmethod
    def from_dict(cls, d: Mapping[str, int]) -> SeverityCounts:
        return cls(**{s: int(d.get(s, 0)) for s in SEVERITIES})


def finding(code: str, message: str, names=(), *, severity: str | None = None, hint: str | None = None,
            **data: Any) -> Finding:
    """Build a finding from the catalogue; severity and hint default to the rule's."""
    rule = RULES[code]
    return Finding(code=code, severity=severity or rule.severity, message=message,
                   names=tuple(sorted(names)), hint=rule.hint if hint is None else hint, data=data)


def sort_findings(findings) -> list[Finding]:
    return sorted(findings, key=lambda f: (-SEVERITY_RANK[f.severity], f.code, f.names, f.message))

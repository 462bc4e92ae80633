"""A PEFT adapter held against its base model's ties: what it costs and what a merge does.

An adapter that saves one side of a tie whole (``modules_to_save = ["lm_head"]`` on a model whose
head is the embedding) trains an independent copy; ``merge_and_unload`` puts that copy in the
model, so the merged head differs from the embedding while the config may still say tied (the
bug of peft#2777 and transformers#45127). LoRA on one side of a tie (``target_modules`` matching
``lm_head``) adds its delta into the shared tensor on merge, so the other side changes too.
Modules are matched as peft matches them: a name equal to the module path or ending it after a
dot, a string as a regular expression on the whole path. Pure and torch-free: the equality of a
saved copy with the base tensor is measured by the caller.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tiecheck.analyses.ties import TieGroup
from tiecheck.findings import Finding, finding


def module_matches(key: str, spec: Sequence[str] | str | None) -> bool:
    """Whether peft's ``target_modules`` / ``modules_to_save`` / ``exclude_modules`` value matches a module path."""
    if not spec:
        return False
    if isinstance(spec, str):
        try:
            return re.fullmatch(spec, key) is not None
        except re.error:
            return False
    return any(key == m or key.endswith("." + m) for m in spec)


def _module(name: str) -> str:
    return name.rsplit(".", 1)[0] if "." in name else ""


def missing_modules(info: Mapping[str, Any], base_names: Iterable[str]) -> list[Finding]:
    """TC024 for each listed module the base model does not have (peft refuses such a config)."""
    modules = {_module(n) for n in base_names}
    out = []
    for field in ("modules_to_save", "target_modules"):
        spec = info.get(field)
        if not spec:
            continue
        entries = [spec] if isinstance(spec, str) else list(spec)
        for m in entries:
            if spec == "all-linear" or any(module_matches(k, [m] if not isinstance(spec, str) else m) for k in modules):
                continue
            out.append(finding("TC024", f"adapter_config.json {field} names {m!r}, but the base model has no module "
                                        f"{'matching' if isinstance(spec, str) else 'named'} {m!r}: peft refuses to "
                                        f"load the adapter on it", [m]))
    return out


def touched_ties(info: Mapping[str, Any], base_groups: Sequence[TieGroup],
                 adapter_bytes: Mapping[str, int], copy_equal: Mapping[str, bool | None]) -> list[dict[str, Any]]:
    """One row per tied name the adapter touches.

    Args:
        info: the adapter's ``extra["peft"]`` (``loaders/peft_adapter.py``).
        base_groups: the base report's tie groups.
        adapter_bytes: base module path -> bytes the adapter stores for it.
        copy_equal: base tensor name -> whether the adapter's whole copy equals the base tensor
            (None: not compared).

    Returns:
        Rows with the tie's names, the touched name, how (``modules_to_save`` or
        ``target_modules``), the adapter's bytes for it, for a whole copy whether it equals the base,
        and whether peft ties the copies again (``ensure_weight_tying``).
    """
    rows = []
    excluded = info.get("exclude_modules")
    for g in base_groups:
        names = list(g.names)
        for n in names:
            mod = _module(n)
            how = None
            if module_matches(mod, info.get("modules_to_save")):
                how = "modules_to_save"
            elif module_matches(mod, info.get("target_modules")) and not module_matches(mod, excluded):
                how = "target_modules"
            if how is None:
                continue
            rows.append({"names": names, "touched": n, "how": how, "bytes": int(adapter_bytes.get(mod, 0)),
                         "equal_to_base": copy_equal.get(n) if how == "modules_to_save" else None})
    for r in rows:
        # ensure_weight_tying: peft adds the other side of the tie to the adapter and ties the two
        # copies again (in the adapter and on merge), so the tie survives.
        r["retied_by_peft"] = bool(info.get("ensure_weight_tying"))
    return rows


def adapter_findings(rows: Sequence[Mapping[str, Any]], declared_by: Mapping[frozenset, Sequence[str]]) -> list[Finding]:
    """TC023 for each touched tie: the bytes it costs and what ``merge_and_unload`` does."""
    out = []
    for r in rows:
        if r["retied_by_peft"]:
            continue
        n, others = r["touched"], [m for m in r["names"] if m != r["touched"]]
        other = ", ".join(others)
        by = declared_by.get(frozenset(r["names"])) or []
        tie = f"the base ties it to {other}" + (f" ({' and '.join(by)})" if by else "")
        if r["how"] == "modules_to_save":
            if r["equal_to_base"] is True:
                state = (f"the copy still equals the base's (untrained): {r['bytes']:,} bytes stored for nothing, and "
                         f"after merge_and_unload() the two hold equal values in separate memory (TC016 where the "
                         f"flag still says tied)")
            else:
                state = ("the copy differs from the base's (trained)" if r["equal_to_base"] is False else
                         "the copy is trained apart") + \
                    (f": merge_and_unload() puts it in the model, so {n} no longer equals {other}; peft versions "
                     f"that leave tie_word_embeddings=true (peft#2777) produce a model that says tied while its "
                     f"head differs (TC015: transformers 4 and engines that trust the flag serve {other} as {n}); "
                     f"peft 0.21 sets the flag false in memory, so the merged model is untied and stores "
                     f"{r['bytes']:,} more bytes")
            out.append(finding("TC023", f"adapter_config.json modules_to_save saves {n} whole ({r['bytes']:,} bytes), "
                                        f"but {tie}: an independent copy of one side of a tie; {state}",
                               r["names"], bytes=r["bytes"]))
        else:
            out.append(finding("TC023", f"adapter_config.json target_modules trains a LoRA delta for {n} "
                                        f"({r['bytes']:,} bytes), but {tie}: merge_and_unload() adds the delta into "
                                        f"the shared tensor, so {other} changes with it (the input side gets the "
                                        f"output side's update)", r["names"], bytes=r["bytes"]))
    return out

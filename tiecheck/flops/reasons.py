"""Why a forward could not be traced, as a sentence a reader can act on.

An exception's own text ("AttributeError: 'NoneType' object has no attribute 'shape'") says
where the model's code fell over, not why tiecheck could not count it, nor what to do. The
reason is said in words; the exceptions themselves stay in ``FlopsResult.errors``.
"""

from __future__ import annotations

import re
from typing import Any

# Forward inputs tiecheck never synthesizes, and what each holds.
OTHER_INPUTS = {
    "pixel_values": "images",
    "pixel_values_videos": "video frames",
    "input_features": "audio features",
    "input_values": "raw audio",
    "image_embeds": "image embeddings",
    "qformer_input_ids": "Q-Former token ids",
    "image_encoder_embeddings": "image embeddings",
    "audio_values": "audio",
    "flattened_patches": "image patches",
    "bbox": "layout boxes",
    "lang_ids": "language ids",
}
PASS_INPUTS = "pass the forward's inputs with inputs= (--inputs FILE.py:make_inputs)"
_MISSING_ARGS = re.compile(r"missing \d+ required positional arguments?: (.+)$")
_QUOTED = re.compile(r"'(\w+)'")
WHERE = {"meta": "on the meta device", "real": "with real tensors", "real-batch-1": "with real tensors"}


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _other_inputs(names) -> str:
    return " and ".join(f"{n} ({OTHER_INPUTS[n]})" if n in OTHER_INPUTS else n for n in names)


def needed_inputs(e: BaseException, module: Any) -> list[str]:
    """The inputs other than token ids a failed forward asked for: its missing positional arguments, its
    main input when that is not ``input_ids``, and the inputs its error names."""
    msg = str(e)
    first = msg.strip().splitlines()[0] if msg.strip() else ""
    missing = _MISSING_ARGS.search(first)
    names = _QUOTED.findall(missing.group(1)) if missing else []
    main = getattr(module, "main_input_name", "input_ids")
    if main in OTHER_INPUTS:
        names.append(main)
    names += [n for n in OTHER_INPUTS if re.search(rf"\b{n}\b", msg, re.IGNORECASE)]
    if re.search(r"\blanguage\b", msg, re.IGNORECASE):  # X-MOD: "Input language unknown"
        names.append("lang_ids")
    return list(dict.fromkeys(names))


def cause(e: BaseException, module: Any, synthesized: bool) -> str:
    """What made one trace fail, in words.

    Args:
        e: the exception the trace raised.
        module: the traced module.
        synthesized: the inputs were tiecheck's token ids (not the caller's).

    Returns:
        A clause such as "its forward needs pixel_values (images), which tiecheck does not synthesize".
    """
    msg = str(e)
    missing = _MISSING_ARGS.search(msg.strip().splitlines()[0] if msg.strip() else "")
    if synthesized and missing:
        return f"its forward needs {_other_inputs(_QUOTED.findall(missing.group(1)))} besides token ids"
    main = getattr(module, "main_input_name", "input_ids")
    if synthesized and main in OTHER_INPUTS:
        return f"its forward reads {_other_inputs([main])}, not token ids"
    named = [n for n in OTHER_INPUTS if re.search(rf"\b{n}\b", msg)]
    if synthesized and named:
        return f"its forward needs {_other_inputs(named)} besides token ids"
    if ".item()" in msg:
        return "the forward calls .item() on a tensor, which has no value on the meta device"
    if "nonzero" in msg:
        return "the forward calls torch.nonzero, whose output size depends on the values (it has no meta kernel)"
    if "Cannot copy out of meta tensor" in msg:
        return "the forward copies a tensor's data, which a meta tensor does not hold"
    if "not among the descendants" in msg or (isinstance(e, KeyError) and "(" in msg):
        return "fvcore cannot place a module the forward calls in the model's module tree"
    kind = type(e).__name__
    return f"the model's forward raised {_article(kind)} {kind} under the trace"


def unavailable_reason(failures: list[tuple[str, BaseException]], module: Any, synthesized: bool) -> str:
    """One sentence for every trace that failed, with what to do where the inputs were the cause.

    ``failures`` holds ``(method, exception)`` in the order tried: "meta", "real", "real-batch-1",
    or "inputs" where making the inputs failed.
    """
    if not failures:
        return "nothing to trace"
    if failures[0][0] == "inputs":
        e = failures[0][1]
        detail = (str(e).strip().splitlines() or [""])[0][:200]
        what = f"the inputs could not be made ({detail})" if detail else "the inputs could not be made"
        return f"{what}; {PASS_INPUTS}"
    causes: list[str] = []
    retried = [(m, e) for m, e in failures if " with " in m]
    for m, e in failures:
        # A retry with synthesized images or audio: the inputs were there, so its cause is what the model did.
        c = cause(e, module, synthesized and (m, e) not in retried)
        if (m, e) in retried:
            c = f"with synthesized {_other_inputs(m.split(' with ', 1)[1].split(' and '))} as well, {_lower(c)}"
        if c not in causes:
            causes.append(c)
    tried = " and ".join(dict.fromkeys(WHERE.get(m.split(" with ")[0], m) for m, _ in failures))
    text = f"the forward could not be traced {tried}: {'; '.join(causes)}"
    if (synthesized and retried) or any("token ids" in c for c in causes):
        text += f"; {PASS_INPUTS}"
    else:
        text += " (flops.errors holds the exceptions)"
    return text


def _lower(clause: str) -> str:
    return clause[:1].lower() + clause[1:]


def fallback_note(method: str, e: BaseException, module: Any, synthesized: bool) -> str:
    """The note of a trace that failed before another one counted."""
    return f"fell back after the trace {WHERE.get(method, method)} failed: {cause(e, module, synthesized)}"

"""Operator handles: one per aten op that does arithmetic, each returning FLOPs from shapes.

A handle has fvcore's signature ``handle(inputs, outputs) -> Counter`` where the counter's keys
are ``"<part>/<op>"`` (the part of the model the product belongs to, see :data:`PARTS`) and its
values FLOPs (two per multiply-add). The tables say which ops pass a weight through unchanged,
which do no arithmetic and which are deliberately ignored; :class:`Classifier` decides which part
of the model a product belongs to. The tracing engine that calls them is :mod:`tiecheck.flops.trace`.
"""

from __future__ import annotations

import re
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from torch import nn

from tiecheck.flops.moe import experts_kind

with warnings.catch_warnings():
    # importing fvcore.nn scripts a few loss functions, which newer torch deprecates
    warnings.simplefilter("ignore", DeprecationWarning)
    from fvcore.nn.jit_handles import conv_flop_count

# Ops that reach a weight without changing what it is (views, casts, splits).
_PASS_THROUGH = frozenset(
    "aten::" + n
    for n in (
        "t", "transpose", "permute", "view", "reshape", "contiguous", "to", "type_as", "detach",
        "clone", "expand", "expand_as", "unsqueeze", "squeeze", "slice", "select", "narrow",
        "flatten", "unflatten", "numpy_T", "mT", "mH", "adjoint", "chunk", "split",
        "split_with_sizes", "unsafe_chunk", "unsafe_split", "unbind", "alias", "float", "half",
        "bfloat16", "_cast_Float", "_cast_Half", "resolve_conj", "resolve_neg", "view_as",
        "reshape_as", "movedim", "swapaxes", "swapdims", "tensor_split",
    )
) | {"prim::ListUnpack", "prim::TupleUnpack", "prim::ListConstruct", "prim::TupleConstruct"}

# Ops with no arithmetic at all -- shape queries, views, copies, casts, indexing, tensor
# creation. They are skipped like fvcore skips them, and not listed anywhere.
NO_ARITHMETIC = frozenset(
    ["size", "numel", "dim", "Int", "Float", "Bool", "ScalarImplicit", "item", "is_floating_point", "_shape_as_tensor", "sym_size", "contiguous", "view", "reshape", "permute", "transpose", "t", "expand", "expand_as", "unsqueeze", "squeeze", "slice", "select", "narrow", "flatten", "unflatten", "chunk", "split", "split_with_sizes", "unbind", "to", "type_as", "clone", "alias", "view_as", "reshape_as", "movedim", "swapaxes", "swapdims", "numpy_T", "mT", "mH", "adjoint", "tensor_split", "unsafe_chunk", "unsafe_split", "as_strided", "_unsafe_view", "_reshape_alias", "resolve_conj", "resolve_neg", "lift", "lift_fresh", "_to_copy", "to_dense", "expand_copy", "detach", "copy", "fill", "zero", "float", "half", "bfloat16", "_cast_Float", "_cast_Half", "cat", "concat", "concatenate", "stack", "hstack", "vstack", "repeat", "repeat_interleave", "tile", "roll", "flip", "pad", "constant_pad_nd", "gather", "scatter", "index", "index_select", "index_put", "index_fill", "take", "take_along_dim", "masked_select", "nonzero", "arange", "linspace", "ones", "ones_like", "zeros", "zeros_like", "full", "full_like", "empty", "empty_like", "new_ones", "new_zeros", "new_full", "new_empty", "new_tensor", "tensor", "scalar_tensor", "eye", "diagonal", "diag", "diag_embed", "tril", "triu", "view_as_real", "view_as_complex", "__getitem__", "_assert_async", "dropout", "feature_dropout", "alpha_dropout", "native_dropout", "unfold"]
)

# Ops with arithmetic that is deliberately not counted (see the module docstring). They are
# listed in ``ignored_ops`` with their call counts.
IGNORED = frozenset(
    ["add", "sub", "rsub", "mul", "div", "true_divide", "floor_divide", "neg", "reciprocal", "pow", "sqrt", "rsqrt", "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "abs", "sign", "sgn", "square", "tanh", "sigmoid", "silu", "gelu", "relu", "relu6", "leaky_relu", "elu", "selu", "celu", "mish", "hardswish", "hardsigmoid", "hardtanh", "softplus", "glu", "sin", "cos", "tan", "atan", "atan2", "asin", "acos", "sinh", "cosh", "asinh", "acosh", "atanh", "erf", "erfc", "erfinv", "softmax", "log_softmax", "_softmax", "_log_softmax", "layer_norm", "group_norm", "batch_norm", "instance_norm", "rms_norm", "native_layer_norm", "masked_fill", "masked_scatter", "where", "clamp", "clamp_min", "clamp_max", "clip", "minimum", "maximum", "fmin", "fmax", "lerp", "addcmul", "addcdiv", "mean", "sum", "prod", "max", "min", "amax", "amin", "argmax", "argmin", "std", "var", "norm", "linalg_vector_norm", "cumsum", "cumprod", "logsumexp", "topk", "sort", "argsort", "all", "any", "eq", "ne", "lt", "le", "gt", "ge", "logical_and", "logical_or", "logical_not", "logical_xor", "bitwise_and", "bitwise_or", "bitwise_not", "bitwise_xor", "__and__", "__or__", "__xor__", "__not__", "__iand__", "__ior__", "__ixor__", "__lshift__", "__rshift__", "__ilshift__", "__irshift__", "isnan", "isinf", "isfinite", "nan_to_num", "round", "floor", "ceil", "trunc", "frac", "fmod", "remainder", "embedding", "embedding_bag", "one_hot", "scatter_add", "index_add", "diff", "bucketize", "searchsorted", "rand", "randn", "randint", "rand_like", "randn_like", "bernoulli", "multinomial", "polar", "complex", "real", "imag", "angle", "upsample_nearest2d", "upsample_bilinear2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "avg_pool1d", "avg_pool2d", "max_pool1d", "max_pool2d"]
)


def _op_key(kind: str) -> str:
    return kind.split("::", 1)[-1]


def in_table(kind: str, names: frozenset) -> bool:
    if not kind.startswith("aten::"):
        return False
    name = _op_key(kind)
    return name in names or name.rstrip("_") in names


def _shape(v: Any) -> list[int] | None:
    try:
        if v.isCompleteTensor():
            return list(v.type().sizes())
    except RuntimeError:
        pass
    return None


def _const(v: Any) -> Any:
    try:
        return v.toIValue()
    except RuntimeError:
        return None


def _named_input(node: Any, name: str) -> Any:
    try:
        v = node.namedInput(name)
    except (RuntimeError, AttributeError):
        return None
    return _const(v)


def _prod(xs: Sequence[int]) -> int:
    out = 1
    for x in xs:
        out *= int(x)
    return out


def _broadcast(a: Sequence[int], b: Sequence[int]) -> list[int]:
    out = []
    for i in range(max(len(a), len(b))):
        x = a[len(a) - 1 - i] if i < len(a) else 1
        y = b[len(b) - 1 - i] if i < len(b) else 1
        out.append(max(x, y))
    return out[::-1]


def _matmul_macs(a: Sequence[int], b: Sequence[int]) -> int:
    """Multiply-adds of torch.matmul(a, b) with numpy broadcasting and 1-D operands."""
    if not a or not b:
        return 0
    if len(a) == 1 and len(b) == 1:
        return int(a[0])
    if len(a) == 1:
        a = [1, a[0]]
    if len(b) == 1:
        b = [b[0], 1]
    m, k = a[-2], a[-1]
    n = b[-1]
    batch = _broadcast(a[:-2], b[:-2])
    return _prod(batch) * m * k * n


def _einsum_macs(equation: str, shapes: Sequence[Sequence[int]]) -> int:
    """Multiply-adds of an einsum, contracting operands left to right.

    A two-operand einsum costs the product of the sizes of all its distinct indices (the
    usual matmul count). One operand (a sum or permutation) costs nothing here.
    """
    eq = equation.replace(" ", "")
    lhs, _, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"einsum {equation!r}: {len(terms)} terms for {len(shapes)} operands")
    # expand "..." into fresh upper-case letters unused by the equation
    spare = [c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZ" if c not in eq]
    ell = max((len(s) - len(t.replace("...", "")) for t, s in zip(terms, shapes, strict=True) if "..." in t), default=0)
    ell_letters = "".join(spare[:ell])
    expanded = []
    for t, s in zip(terms, shapes, strict=True):
        if "..." in t:
            n = len(s) - len(t.replace("...", ""))
            t = t.replace("...", ell_letters[ell - n:] if n else "")
        expanded.append(t)
    if not rhs and "->" not in eq:
        counts = Counter("".join(expanded))
        rhs = "".join(sorted(c for c, k in counts.items() if k == 1))
    rhs = rhs.replace("...", ell_letters)
    size: dict[str, int] = {}
    for t, s in zip(expanded, shapes, strict=True):
        for c, d in zip(t, s, strict=True):
            size[c] = max(size.get(c, 1), int(d))
    if len(expanded) < 2:
        return 0
    macs = 0
    cur = expanded[0]
    for i in range(1, len(expanded)):
        nxt = expanded[i]
        macs += _prod(size[c] for c in set(cur) | set(nxt))
        later = set(rhs).union(*[set(t) for t in expanded[i + 1:]])
        cur = "".join(sorted((set(cur) | set(nxt)) & later))
    return macs


class Classifier:
    """Decides the part of each counted op and records attention calls."""

    def __init__(self, root: nn.Module, prefix: str, n_inputs: int, vocab_size: int | None,
                 family: str, attention: str) -> None:
        self.prefix = prefix
        self.n_inputs = n_inputs
        self.vocab_size = vocab_size
        self.family = family
        self.half_causal = attention == "causal-half"
        self.modules: dict[str, nn.Module] = dict(root.named_modules())
        self.attention_names: set[str] = set()
        self.layer_names: set[str] = set()
        pat = re.compile(r"attn|attention", re.IGNORECASE)
        # token mixers of state-space and linear-recurrent layers count as attention (docs/flops.md)
        mixer_attr = re.compile(r"^(mixer|mamba|ssm|temporal_block)$", re.IGNORECASE)
        not_mixer = re.compile(r"MLP|MoE|Experts|FeedForward", re.IGNORECASE)
        for name, m in self.modules.items():
            if not name:
                continue
            attr, cls_name = name.rsplit(".", 1)[-1], type(m).__name__
            if pat.search(attr) or pat.search(cls_name) or (mixer_attr.search(attr) and not not_mixer.search(cls_name)):
                self.attention_names.add(name)
        for name, m in self.modules.items():
            if isinstance(m, (nn.ModuleList, nn.Sequential)):
                for child, _ in m.named_children():
                    full = f"{name}.{child}" if name else child
                    if any(a == full or a.startswith(full + ".") for a in self.attention_names):
                        self.layer_names.add(full)
        # mixture of experts: routed and shared experts, and routers (a gate beside routed experts)
        self.experts_names: set[str] = set()
        self.router_names: set[str] = set()
        for name, m in self.modules.items():
            kinds = {n: experts_kind(n, c) for n, c in m.named_children()}
            if "routed" not in kinds.values():
                continue
            for child, kind in kinds.items():
                full = f"{name}.{child}" if name else child
                if kind in ("routed", "shared"):
                    self.experts_names.add(full)
                elif kind == "router":
                    self.router_names.add(full)
        # per-layer FLOPs and attention calls, for layers traced once and multiplied
        self.layer_of: Callable[[str], int | None] = lambda owner: None
        self.per_layer: dict[int, Counter] = {}
        self.per_layer_calls: dict[int, Counter] = {}
        self.calls: Counter = Counter()
        self.failed: Counter = Counter()
        self.failures: dict[str, str] = {}
        self._cache: dict[str, tuple[str, ...]] = {}
        self._windows: dict[str, tuple[str, int] | None] = {}

    def owner(self, node: Any) -> str:
        scope = node.scopeName().split("/")[-1]
        if scope == self.prefix.rstrip("."):
            return ""
        return scope.removeprefix(self.prefix)

    def ancestors(self, name: str) -> tuple[str, ...]:
        """``name`` and its enclosing module names, nearest first."""
        got = self._cache.get(name)
        if got is None:
            parts = name.split(".") if name else []
            got = tuple(".".join(parts[:i]) for i in range(len(parts), 0, -1))
            self._cache[name] = got
        return got

    def is_weight(self, v: Any) -> bool:
        for _ in range(64):
            node = v.node()
            kind = node.kind()
            if kind == "prim::Param":
                return v.offset() >= self.n_inputs
            if kind == "prim::Constant":
                return _shape(v) is not None  # a tensor constant: a captured weight
            if kind in _PASS_THROUGH:
                ins = list(node.inputs())
                if not ins:
                    return False
                v = ins[0]
                continue
            return False
        return False

    def in_attention(self, owner: str) -> bool:
        return any(a in self.attention_names for a in self.ancestors(owner))

    def moe_part(self, owner: str) -> str | None:
        """"experts" or "router" for an op inside such a module of an MoE block, else None."""
        if not (self.experts_names or self.router_names):
            return None
        for a in self.ancestors(owner):
            if a in self.experts_names:
                return "experts"
            if a in self.router_names:
                return "router"
        return None

    def in_layer(self, owner: str) -> bool:
        return any(a in self.layer_names for a in self.ancestors(owner))

    def causal(self, owner: str, flag: Any, tq: int, tk: int) -> bool:
        if flag is True:
            return True
        for a in self.ancestors(owner):
            v = getattr(self.modules.get(a), "is_causal", None)
            if isinstance(v, bool):
                return v
        return self.family == "decoder" and tq == tk

    def window_of(self, owner: str) -> tuple[str, int] | None:
        """("sliding", w) or ("chunked", c) for the attention layer around ``owner``, else None.

        Read from the config as the architecture reads it: ``layer_types[layer_idx]``
        ("sliding_attention" -> ``sliding_window``, "chunked_attention" -> ``attention_chunk_size``)
        where the config has ``layer_types``; else a per-module integer ``sliding_window``; else a
        config-wide ``sliding_window`` (Mistral windows every layer).
        """
        if owner in self._windows:
            return self._windows[owner]
        got = None
        for a in self.ancestors(owner):
            m = self.modules.get(a)
            idx, config = getattr(m, "layer_idx", None), getattr(m, "config", None)
            if not isinstance(idx, int) or config is None:
                continue
            types = getattr(config, "layer_types", None)
            if isinstance(types, (list, tuple)) and 0 <= idx < len(types):
                size = {"sliding_attention": getattr(config, "sliding_window", None),
                        "chunked_attention": getattr(config, "attention_chunk_size", None)}.get(types[idx])
                kind = "chunked" if types[idx] == "chunked_attention" else "sliding"
            else:
                size = getattr(m, "sliding_window", None)
                if not isinstance(size, int) or isinstance(size, bool):
                    size = getattr(config, "sliding_window", None)
                kind = "sliding"
            if isinstance(size, int) and not isinstance(size, bool) and size > 0:
                got = (kind, size)
            break
        self._windows[owner] = got
        return got

    def attention_flops(self, owner: str, macs: int, flag: Any, tq: int, tk: int) -> int:
        causal = self.causal(owner, flag, tq, tk)
        self.calls["calls"] += 1
        self.calls["causal"] += int(causal)
        flops = 2 * macs
        if causal and self.half_causal:
            flops //= 2
        # windows bound causal self-attention; cross- and bidirectional attention keep the full matrix
        window = self.window_of(owner) if causal and tq > 0 and tk > 0 else None
        if window is not None:
            got = windowed_flops(macs // (tq * tk), tq, tk, window, causal and self.half_causal)
            if got is not None and got != flops:
                # the full-matrix figure stays beside the windowed one (attention_full_matrix)
                self.calls["windowed"] += 1
                self.calls["window_saved"] += flops - got
                flops = got
        return flops

    def part_of_product(self, node: Any, operands: Sequence[Any], out_shape: list[int] | None,
                        vocab_check: bool = True) -> str:
        owner = self.owner(node)
        moe = self.moe_part(owner)
        if moe is not None:
            # expert weights are gathered per token (batched_mm) or grouped: not plain weights
            return moe
        if any(self.is_weight(v) for v in operands):
            # logits are made outside the layers, so an MLP as wide as the vocab stays an MLP
            if self.in_attention(owner):
                return "attention_projections"
            if self.in_layer(owner):
                return "mlp"
            if vocab_check and self.vocab_size and out_shape and out_shape[-1] == self.vocab_size:
                return "output_projection"
            return "other"
        if self.in_attention(owner):
            return "attention"
        return "other"


def windowed_flops(per_pair: int, tq: int, tk: int, window: tuple[str, int], half: bool) -> int | None:
    """FLOPs of one attention product restricted to a sliding window or to chunks.

    ``per_pair`` is the multiply-adds of one (query, key) pair. Under the full-matrix convention
    each query of a sliding window w is counted with min(tk, w) keys; a chunk of c positions is a
    c x c block. Causal-half keeps the same band and drops the masked triangle inside it
    (w' x w' / 2 with w' = min(T, w), c x c / 2 per chunk), so when T <= w the figure equals the
    full matrix's under either convention. Chunks need tq == tk (a prefill): else None.
    """
    kind, size = window
    if kind == "sliding":
        w = min(tk, size)
        if half and tq == tk:
            return per_pair * (2 * tq * w - w * w)
        return 2 * per_pair * tq * w
    if tq != tk:
        return None
    full, rest = divmod(tq, size)
    squares = full * size * size + rest * rest
    return per_pair * squares if half else 2 * per_pair * squares


# -- the handles: one function per kind of op, each (classifier, inputs, outputs) -> FLOPs by "part/op" --------

Handle = Callable[[Classifier, list, list], Counter]


def product(name: str, operands_of: Callable[[list], list], macs_of: Callable[[list, list], int]) -> Handle:
    """The handle of a matrix product: its operands' shapes give the multiply-adds, its place the part."""

    def handle(cls: Classifier, inputs: list, outputs: list) -> Counter:
        node = outputs[0].node()
        ops = operands_of(inputs)
        shapes = [_shape(v) for v in ops]
        if any(s is None for s in shapes):
            raise ValueError(f"{name}: operand shapes unknown in the trace")
        macs = int(macs_of(shapes, inputs))
        part = cls.part_of_product(node, ops, _shape(outputs[0]), True)
        if part == "attention":
            s0 = shapes[0]
            tq = s0[-2] if len(s0) >= 2 else 1
            flops = cls.attention_flops(cls.owner(node), macs, None, tq, tq)
        else:
            flops = 2 * macs
        return Counter({f"{part}/{name}": flops})

    handle.__name__ = handle.__qualname__ = f"{name}_flops"
    return handle


def _first_two(inputs: list) -> list:
    return inputs[:2]


def _after_bias(inputs: list) -> list:  # addmm & co: bias, a, b
    return inputs[1:3]


def _einsum_operands(inputs: list) -> list:
    return list(inputs[1].node().inputs())


def _mm_macs(shapes: list, _: list) -> int:
    return _matmul_macs(shapes[0], shapes[1])


def _linear_macs(shapes: list, _: list) -> int:
    x, w = shapes
    return _prod(x[:-1]) * w[-1] * (w[0] if len(w) == 2 else 1)


def _addbmm_macs(shapes: list, _: list) -> int:
    a, b = shapes
    return a[0] * a[1] * a[2] * b[2]


def _grouped_mm_macs(shapes: list, _: list) -> int:
    # Group offsets only say which rows go to which group: the products' total is fixed by
    # the shapes, so it is read from them, never from offsets (garbage on meta).
    a, b = shapes
    if len(a) == 2 and len(b) == 3:  # (S, K) x (G, K, N): every row through one group
        return a[0] * a[1] * b[2]
    if len(a) == 3 and len(b) == 2:  # (G, M, K) x (K, N_total): every column through one group
        return a[1] * a[2] * b[1]
    if len(a) == 2 and len(b) == 2:  # (M, K_total) x (K_total, N): K split into groups
        return a[0] * a[1] * b[1]
    if len(a) == 3 and len(b) == 3:  # a batch of G products
        return a[0] * a[1] * a[2] * b[2]
    raise ValueError(f"grouped_mm: unexpected operand ranks {len(a)}, {len(b)}")


def _solve_triangular_macs(shapes: list, _: list) -> int:
    # forward/back substitution: n(n-1)/2 multiply-adds per right-hand column (divisions not counted)
    a, b = shapes
    n = a[-1]
    return _prod(_broadcast(a[:-2], b[:-2])) * n * (n - 1) // 2 * b[-1]


def _einsum_macs_of(shapes: list, inputs: list) -> int:
    return _einsum_macs(_const(inputs[0]), shapes)


def convolution_flops(cls: Classifier, inputs: list, outputs: list) -> Counter:
    """Every convolution, transposed or not, through fvcore's own count."""
    node = outputs[0].node()
    x, w, out = _shape(inputs[0]), _shape(inputs[1]), _shape(outputs[0])
    if x is None or w is None or out is None:
        raise ValueError("convolution: shapes unknown in the trace")
    transposed = "transpose" in node.kind() or _named_input(node, "transposed") is True
    macs = int(conv_flop_count(x, w, out, transposed=transposed))
    part = cls.part_of_product(node, inputs[:2], None, vocab_check=False)
    return Counter({f"{part}/convolution": 2 * macs})


def attention(layout: str, causal_arg: str) -> Handle:
    """The handle of a fused attention kernel. ``layout`` "bhtd": (..., T, d) as SDPA; "bthd": (B, T, H, d)
    as the raw kernels; ``causal_arg`` the input that says the mask is causal."""

    def handle(cls: Classifier, inputs: list, outputs: list) -> Counter:
        node = outputs[0].node()
        q, k, v = (_shape(x) for x in inputs[:3])
        if q is None or k is None or v is None:
            raise ValueError("attention: q/k/v shapes unknown in the trace")
        if layout == "bhtd":
            tq, e, tk, ev = q[-2], q[-1], k[-2], v[-1]
            bh = _prod(q[:-2])
        else:
            tq, e, tk, ev = q[1], q[-1], k[1], v[-1]
            bh = q[0] * q[2]
        macs = bh * tq * tk * (e + ev)
        flag = _named_input(node, causal_arg)
        if causal_arg == "custom_mask_type":
            flag = isinstance(flag, int) and flag > 0
        return Counter({f"attention/{_op_key(node.kind())}": cls.attention_flops(cls.owner(node), macs, flag, tq, tk)})

    handle.__name__ = handle.__qualname__ = f"attention_{layout}_flops"
    return handle


_SDPA = attention("bhtd", "is_causal")
_CONVOLUTION_OPS = ("aten::_convolution", "aten::convolution", "aten::conv1d", "aten::conv2d", "aten::conv3d",
                    "aten::conv_transpose1d", "aten::conv_transpose2d", "aten::conv_transpose3d")
_SDPA_OPS = ("aten::scaled_dot_product_attention", "aten::_scaled_dot_product_attention_math",
             "aten::_scaled_dot_product_flash_attention", "aten::_scaled_dot_product_flash_attention_for_cpu",
             "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_cudnn_attention",
             "aten::_scaled_dot_product_fused_attention_overrideable")

# The op -> handle table, as fvcore's jit_handles keeps its own: counting one more op is one line here.
HANDLES: dict[str, Handle] = {
    "aten::linear": product("linear", _first_two, _linear_macs),
    "aten::matmul": product("matmul", _first_two, _mm_macs),
    "aten::mm": product("mm", _first_two, _mm_macs),
    "aten::bmm": product("bmm", _first_two, _mm_macs),
    "aten::mv": product("mv", _first_two, _mm_macs),
    "aten::dot": product("dot", _first_two, _mm_macs),
    "aten::vdot": product("vdot", _first_two, _mm_macs),
    "aten::addmm": product("addmm", _after_bias, _mm_macs),
    "aten::addmv": product("addmv", _after_bias, _mm_macs),
    "aten::baddbmm": product("baddbmm", _after_bias, _mm_macs),
    "aten::addbmm": product("addbmm", _after_bias, _addbmm_macs),
    "aten::einsum": product("einsum", _einsum_operands, _einsum_macs_of),
    "aten::linalg_solve_triangular": product("linalg_solve_triangular", _first_two, _solve_triangular_macs),
    "aten::_grouped_mm": product("_grouped_mm", _first_two, _grouped_mm_macs),
    "aten::grouped_mm": product("grouped_mm", _first_two, _grouped_mm_macs),
    "aten::_scaled_grouped_mm": product("_scaled_grouped_mm", _first_two, _grouped_mm_macs),
    "transformers::grouped_mm_fallback": product("grouped_mm_fallback", _first_two, _grouped_mm_macs),
    **dict.fromkeys(_CONVOLUTION_OPS, convolution_flops),
    **dict.fromkeys(_SDPA_OPS, _SDPA),
    "aten::_flash_attention_forward": attention("bthd", "is_causal"),
    "aten::_efficient_attention_forward": attention("bthd", "custom_mask_type"),
}


def make_handles(cls: Classifier) -> dict[str, Callable[[list, list], Counter]]:
    """The table's handles as fvcore calls them, ``(inputs, outputs)``, bound to one trace's classifier."""
    return {op: _guarded(cls, op, h) for op, h in HANDLES.items()}


def _guarded(cls: Classifier, kind: str, fn: Handle) -> Callable[[list, list], Counter]:
    """A handle that cannot count an op lists it as uncounted instead of failing the count."""

    def handle(inputs: list, outputs: list) -> Counter:
        try:
            layer = cls.layer_of(cls.owner(outputs[0].node())) if outputs else None
            if layer is None:
                return fn(cls, inputs, outputs)
            calls = Counter(cls.calls)
            got = fn(cls, inputs, outputs)
            cls.per_layer.setdefault(layer, Counter()).update(got)
            cls.per_layer_calls.setdefault(layer, Counter()).update(cls.calls - calls)
            return got
        except Exception as e:  # noqa: BLE001 - an odd signature or an incomplete shape
            cls.failed[kind] += 1
            cls.failures.setdefault(kind, describe_error(e))
            return Counter()

    return handle


def describe_error(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0][:300] if msg else ''}".rstrip(": ")

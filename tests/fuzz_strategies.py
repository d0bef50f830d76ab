"""Hypothesis strategies for hostile input, shared by the fuzz tests: values of every JSON/msgpack
type with the edge numbers readers trip on (NaN, infinities, ints past int64 and float range),
nesting deep enough to exhaust a recursive parser, valid documents with a few keys replaced,
removed or added, and tensor headers (arbitrary, or with a buffer that matches the shape so that
the checks behind the length check are reached)."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any

from hivemind.proto import runtime_pb2
from hypothesis import strategies as st

#: numbers at and past every edge a reader converts or compares (floats, int64, JSON's 2^53)
EDGE_NUMBERS = st.sampled_from(
    [
        0,
        -1,
        1,
        2**31,
        2**53 + 1,
        2**63,
        2**64,
        10**400,
        -(10**400),
        1e308,
        -0.0,
        math.inf,
        -math.inf,
        math.nan,
    ]
)
LEAVES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    EDGE_NUMBERS,
    st.floats(),
    st.text(max_size=40),
)
#: anything JSON (with NaN and huge ints) or msgpack could carry
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
MSGPACK_VALUES = st.recursive(
    st.one_of(
        LEAVES.filter(lambda x: not (isinstance(x, int) and not -(2**63) <= x < 2**64)),
        st.binary(max_size=40),
    ),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)
#: nesting deep enough to exhaust a recursive parser
DEEP = st.integers(min_value=1_000, max_value=5_000).map(lambda n: "[" * n + "]" * (n % 3))


def mutated(
    base: dict[str, Any], draw: Callable[[st.SearchStrategy], Any], values: st.SearchStrategy = VALUES
) -> dict[str, Any]:
    """`base` with a few keys replaced, removed or added (nested maps and lists included); `draw` is
    a composite strategy's `draw` or `data.draw`."""
    doc = json.loads(json.dumps(base))
    for _ in range(draw(st.integers(1, 3))):
        target, keys = doc, list(doc)
        nested = [k for k in keys if isinstance(doc[k], (dict, list)) and doc[k]]
        if nested and draw(st.booleans()):
            key = draw(st.sampled_from(nested))
            target = doc[key]
            keys = list(target) if isinstance(target, dict) else list(range(len(target)))
        action = draw(st.sampled_from(["replace", "remove", "add"]))
        if action == "add" and isinstance(target, dict):
            target[draw(st.text(max_size=8))] = draw(values)
        elif action == "remove" and keys:
            del target[draw(st.sampled_from(keys))]
        elif keys:
            target[draw(st.sampled_from(keys))] = draw(values)
    return doc


TENSORS = st.builds(
    runtime_pb2.Tensor,
    buffer=st.binary(max_size=96),
    size=st.lists(st.integers(0, 2**32 - 1), max_size=4),
    dtype=st.sampled_from(["int64", "float32", "bfloat16", "float16", "float64", "bool", "", "int8", "\x00"]),
    requires_grad=st.booleans(),
    compression=st.integers(0, 7),
    chunks=st.integers(0, 3),
)


@st.composite
def matching_tensors(draw: st.DrawFn) -> runtime_pb2.Tensor:
    """A header whose buffer length matches its shape: reaches the checks behind the length check."""
    dtype = draw(st.sampled_from(["int64", "float32", "bfloat16", "float16"]))
    size = draw(st.lists(st.integers(0, 70), min_size=1, max_size=3))
    itemsize = {"int64": 8, "float32": 4, "bfloat16": 2, "float16": 2}[dtype]
    nbytes = math.prod(size) * itemsize
    if nbytes > 1 << 14:
        size, nbytes = [1], itemsize
    return runtime_pb2.Tensor(
        buffer=draw(st.binary(min_size=nbytes, max_size=nbytes)), size=size, dtype=dtype
    )

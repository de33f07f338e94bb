"""The operators of every subgraph of a .tflite flatbuffer, with their weights read in place.

LiteRT's Python interpreter lists the ops of the first subgraph only. A language model's flatbuffer has
one subgraph per signature, and the first (prefill) leaves out what only decoding computes: the last
layer's attention output and MLP after its cache write, and the lm_head. The flatbuffer is read here
through its schema instead: nothing is copied (a path is memory-mapped), and a weight is a view of its
buffer, inside the flatbuffer or, in a model over 2 GB, at its offset in the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

# schema TensorType -> numpy dtype, for the types a weight is stored in
_DTYPES = {0: np.float32, 1: np.float16, 2: np.int32, 3: np.uint8, 4: np.int64, 7: np.int16, 9: np.int8}
# schema TensorType codes of integer types, packed 4- and 2-bit ones included
_INTEGER_TYPES = {2, 3, 4, 7, 9, 12, 15, 16, 17, 19, 20}
_FULLY_CONNECTED, _DEQUANTIZE, _EMBEDDING_LOOKUP = 9, 6, 7


@dataclass
class Op:
    subgraph: int
    code: int  # BuiltinOperator
    inputs: list[int]
    outputs: list[int]


class Flatbuffer:
    def __init__(self, flatbuffer: bytes | Path) -> None:
        from ai_edge_litert import schema_py_generated as schema

        self._bytes = np.memmap(flatbuffer, dtype=np.uint8, mode="r") if isinstance(flatbuffer, Path) else \
            np.frombuffer(flatbuffer, dtype=np.uint8)
        self._model = schema.Model.GetRootAs(self._bytes, 0)
        codes = [self._model.OperatorCodes(i) for i in range(self._model.OperatorCodesLength())]
        # the builtin code moved to a wider field; small codes are still written to the old one too
        self._codes = [max(c.BuiltinCode(), c.DeprecatedBuiltinCode()) for c in codes]

    def ops(self) -> list[Op]:
        found = []
        for index in range(self._model.SubgraphsLength()):
            subgraph = self._model.Subgraphs(index)
            for position in range(subgraph.OperatorsLength()):
                op = subgraph.Operators(position)
                found.append(Op(index, self._codes[op.OpcodeIndex()], [int(i) for i in op.InputsAsNumpy()],
                                [int(i) for i in op.OutputsAsNumpy()]))
        return found

    def name(self, subgraph: int, tensor: int) -> str:
        return self._model.Subgraphs(subgraph).Tensors(tensor).Name().decode()

    def stores_integers(self, subgraph: int, tensor: int) -> bool:
        return self._model.Subgraphs(subgraph).Tensors(tensor).Type() in _INTEGER_TYPES

    def shape(self, subgraph: int, tensor: int) -> tuple[int, ...]:
        return tuple(int(s) for s in self._model.Subgraphs(subgraph).Tensors(tensor).ShapeAsNumpy())

    def constant(self, subgraph: int, tensor: int) -> np.ndarray | None:
        """The tensor's stored values (a view), or None when it is computed or of a type not read here."""
        description = self._model.Subgraphs(subgraph).Tensors(tensor)
        kind = _DTYPES.get(description.Type())
        buffer = self._model.Buffers(description.Buffer())
        if kind is None or buffer is None:
            return None
        if buffer.Offset() > 1:  # stored after the flatbuffer itself
            data = self._bytes[buffer.Offset():buffer.Offset() + buffer.Size()]
        elif not buffer.DataIsNone():
            data = buffer.DataAsNumpy()
        else:
            return None
        return data.view(kind).reshape(self.shape(subgraph, tensor))


def fully_connected(flatbuffer: Flatbuffer) -> list[Op]:
    return [op for op in flatbuffer.ops() if op.code == _FULLY_CONNECTED]


def embedding_tables(flatbuffer: Flatbuffer) -> list[tuple[tuple[int, ...], bool]]:
    """Each EMBEDDING_LOOKUP's table, in every subgraph: its shape, and whether it is stored as integers
    (read directly, or through a DEQUANTIZE op)."""
    ops = flatbuffer.ops()
    dequantised_from = {(op.subgraph, op.outputs[0]): op.inputs[0] for op in ops if op.code == _DEQUANTIZE}
    tables = []
    for op in ops:
        if op.code == _EMBEDDING_LOOKUP:
            stored = dequantised_from.get((op.subgraph, op.inputs[1]), op.inputs[1])
            tables.append((flatbuffer.shape(op.subgraph, stored), flatbuffer.stores_integers(op.subgraph, stored)))
    return tables


def with_integer_weights(flatbuffer: Flatbuffer) -> list[Op]:
    """The FULLY_CONNECTED ops whose weight is stored as integers: read directly (dynamic range) or
    through a DEQUANTIZE op (weight only)."""
    ops = flatbuffer.ops()
    dequantised_from = {(op.subgraph, op.outputs[0]): op.inputs[0] for op in ops if op.code == _DEQUANTIZE}

    def integers(op: Op) -> bool:
        return flatbuffer.stores_integers(op.subgraph, dequantised_from.get((op.subgraph, op.inputs[1]), op.inputs[1]))

    return [op for op in ops if op.code == _FULLY_CONNECTED and integers(op)]

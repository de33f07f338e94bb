"""XNNPACK's preprocessing with only the passes that have something to rewrite.

ExecuTorch's XNNPACK backend runs 17 passes over every partition it lowers, and most of them retrace the
partition through FakeTensors whatever they found. Many rewrite ops a language model's partitions never
hold (convolutions, batch norms, PReLU, max pooling, bilinear upsampling, attention in decomposed form).
Here a pass is skipped when none of the ops it rewrites is in the partition at its turn (an earlier pass
may bring some in), and the lowered program is byte for byte the same: the default model's .pte builds in
a quarter less time (docs/measurements.md "Build time of the .pte").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import cache
from typing import Any


def _names(ops: Any) -> frozenset[str]:
    return frozenset(op.__name__ for op in ops)


@cache
def rewritten_ops() -> dict[str, frozenset[str]]:
    """Pass class name -> the ops whose presence it needs (for the pattern passes: an op every one of
    their patterns contains). Read from the passes' own tables where they have one."""
    from executorch.backends.xnnpack._passes.convert_to_linear import ConvertToLinearPass
    from executorch.backends.xnnpack._passes.decompose_batch_norm import DecomposeBatchNorm
    from executorch.backends.xnnpack._passes.fuse_activation_pass import FuseActivationPass
    from executorch.exir.passes.memory_format_ops_pass import MemoryFormatOpsMap

    batch_norms = _names(DecomposeBatchNorm.BATCH_NORM_OPS)
    return {
        "DimOrderOpsRevertPass": _names(MemoryFormatOpsMap),
        "ConvertToUpsampleBilinear2d": frozenset({"aten.upsample_bilinear2d.vec"}),
        "ConvertToLinearPass": _names(ConvertToLinearPass.targets),
        "ConvertToSDPAPass": frozenset({"aten._softmax.default"}),
        "FuseBatchNormPass": batch_norms,
        "DecomposeBatchNorm": batch_norms,
        "FuseActivationPass": _names(FuseActivationPass.FUSEABLE_ACTIVATIONS),
        "RemoveGetItemPass": frozenset({"aten.max_pool2d_with_indices.default", "aten.max.dim"}),
        "Conv1dUnsqueezePass": frozenset({"aten.convolution.default"}),
        "PReLUReshapePass": frozenset({"aten._prelu_kernel.default"}),
        "RemoveRedundantCopyPass": frozenset({"aten._to_copy.default"}),
    }


def ops_in(graph: Any) -> set[str]:
    return {getattr(node.target, "__name__", "") for node in graph.nodes if node.op == "call_function"}


def has_work(pass_: type, graph: Any) -> bool:
    needs = rewritten_ops().get(pass_.__name__)
    return needs is None or not needs.isdisjoint(ops_in(graph))


@cache
def _manager_with_work_only() -> type:
    from executorch.backends.xnnpack._passes import XNNPACKPassManager, XNNPACKPass
    from executorch.exir.program._program import _transform

    class PassesWithWork(XNNPACKPassManager):
        def transform(self) -> Any:  # XNNPACKPassManager.transform, skipping the passes with nothing to do
            program = self.exported_program
            for pass_ in self.passes:
                if has_work(pass_, program.graph):
                    program = _transform(program, pass_(program) if issubclass(pass_, XNNPACKPass) else pass_())
            return program

    return PassesWithWork


@contextlib.contextmanager
def only_passes_with_work() -> Iterator[None]:
    """While inside, XNNPACK's preprocessing runs only the passes with ops to rewrite."""
    from executorch.backends.xnnpack import xnnpack_preprocess

    original = xnnpack_preprocess.XNNPACKPassManager
    xnnpack_preprocess.XNNPACKPassManager = _manager_with_work_only()
    try:
        yield
    finally:
        xnnpack_preprocess.XNNPACKPassManager = original

"""A Keras functional network run eagerly, each layer's output let go after its last use.

Keras 3.15's ``Functional`` call keeps every layer's output in one dict until the call
returns. Under ``tf.function`` or ``jax.jit`` that dict is only traced, and the compiled graph
frees each buffer when it is done; PyTorch runs the call eagerly, so a network's activations are
all alive at its end: EfficientNetV2M on 8 images at 480 px peaked at 10 GB there, 1.4 GB
with this (bench/torch_memory.txt). On a GPU that caps the batch a card can take.
``call`` walks the same graph in the same order as Keras, and drops each tensor once the last
layer that reads it has run. Nested functional models (the ``+mirror`` descriptor wraps the
network in one; a ``Sequential`` holds one) are walked the same way.
"""

from __future__ import annotations

from collections import Counter
from typing import Any


def call(model: Any, x: Any) -> Any:
    """``model(x, training=False)`` for one input tensor, with what no later layer reads let go.

    A model that is not a plain functional graph of one input (a subclass with its own ``call``,
    or a Keras without the graph attributes read here) is called as Keras calls it.
    """
    from keras import tree
    from keras.src.models.functional import Functional, operation_fn
    from keras.src.models.sequential import Sequential

    if isinstance(model, Sequential) and getattr(model, "_functional", None) is not None:
        model = model._functional
    plain = (
        isinstance(model, Functional)
        and type(model).call is Functional.call
        and len(model.inputs) == 1
        and hasattr(model, "_nodes_by_depth")
        and hasattr(model, "_get_operation_for_node")
    )
    if not plain:
        return model(x, training=False)
    nodes = [
        node
        for depth in sorted(model._nodes_by_depth, reverse=True)
        for node in model._nodes_by_depth[depth]
        if node.operation and not node.is_input
    ]
    readers = Counter(id(t) for node in nodes for t in node.input_tensors)
    kept = {id(t) for t in model.outputs}
    tensors: dict[int, Any] = {id(model.inputs[0]): x}
    for node in nodes:
        if any(id(t) not in tensors for t in node.input_tensors):
            continue  # as Keras does: a node the inputs do not reach
        args, kwargs = node.arguments.fill_in(tensors)
        operation = model._get_operation_for_node(node)
        if isinstance(operation, (Functional, Sequential)) and len(args) == 1 and not kwargs:
            outputs = call(operation, args[0])
        else:
            outputs = operation_fn(operation, training=False)(*args, **kwargs)
        for reference, value in zip(node.outputs, tree.flatten(outputs), strict=False):
            tensors[id(reference)] = value
        del args, kwargs, outputs
        for t in node.input_tensors:
            readers[id(t)] -= 1
            if readers[id(t)] == 0 and id(t) not in kept:
                tensors.pop(id(t), None)
    outputs = tree.pack_sequence_as(model._outputs_struct, [tensors[id(t)] for t in model.outputs])
    return outputs[0] if isinstance(outputs, (list, tuple)) and len(outputs) == 1 else outputs

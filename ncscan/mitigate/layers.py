"""Where things live: ONNX nodes <-> onnx2torch submodules <-> initializers.

Two jobs:

* `tensor_links(net, proto)`: for every float tensor of the converted torch graph (module
  parameters such as `core/fc1/Gemm.weight`, and the `initializers.onnx_initializer_K`
  buffers onnx2torch keeps for MatMul/Add/... operands), the ONNX initializer it came
  from and how to turn the torch tensor back into that initializer (Gemm weights are
  stored transposed when transB=0 and scaled by alpha/beta in torch). Every link is
  verified by value against the original initializer, so writing a changed tensor back
  cannot land in the wrong place.
* `find_layer(proto, net, name)`: the activation the pruning and the filter look at. By
  default the penultimate layer, i.e. the input of the last Gemm/MatMul before the output;
  `--layer NAME` picks the output of another node (ONNX node name, output tensor name, or
  onnx2torch module name).
* `find_last_conv(proto, net)`: the last convolution's channels, where pruning looks by
  default (Fine-Pruning); the penultimate layer when the model has no such conv.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from ..errors import ConfigError, ModelError

# Ops between the last linear layer and the output that keep the class axis.
_PASSTHROUGH = {"Softmax", "LogSoftmax", "Identity", "Add", "Reshape", "Flatten", "Squeeze", "Cast", "Sigmoid", "Mul", "Div", "Sub"}
_LINEAR = {"Gemm", "MatMul"}
# Ops whose initializer operands are worth fine-tuning.
TRAINABLE_OPS = {"Conv", "ConvTranspose", "Gemm", "MatMul", "Add"}


def unique_names(proto: onnx.ModelProto) -> dict[str, onnx.NodeProto]:
    """onnx2torch's submodule name for every top-level node (same rule as OnnxGraph)."""
    from ..tfcompat import block_triton_after_tensorflow

    block_triton_after_tensorflow()
    from onnx2torch.onnx_graph import OnnxGraph

    out: dict[str, onnx.NodeProto] = {}
    counters: dict[str, int] = {}
    for node in proto.graph.node:
        name = OnnxGraph.generate_node_name(node)
        k = counters.setdefault(name, 0)
        counters[name] += 1
        out[name + (f"_{k}" if k > 0 else "")] = node
    return out


@dataclass(frozen=True)
class Link:
    """A torch tensor and the ONNX initializer it was made from."""

    torch_name: str  # name in net.named_parameters() / named_buffers()
    init_name: str
    node: str  # onnx2torch module name of the consuming node
    op_type: str
    transform: str  # "id" | "gemm_w" | "gemm_wT" | "gemm_c"
    scale: float  # alpha (weights) or beta (bias) of a Gemm, else 1
    is_param: bool

    def to_onnx(self, t: torch.Tensor) -> np.ndarray:
        """The torch tensor as the initializer's array."""
        a = t.detach().cpu().float().numpy()
        if self.scale != 1.0:
            a = a / self.scale
        if self.transform == "gemm_wT":
            a = a.T
        return np.ascontiguousarray(a)


def _init_arrays(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in proto.graph.initializer}


def _matches(link: Link, t: torch.Tensor, init: onnx.TensorProto) -> bool:
    try:
        ref = numpy_helper.to_array(init)
    except Exception:  # noqa: BLE001
        return False
    if ref.dtype.kind != "f" or not t.is_floating_point():
        return False
    got = link.to_onnx(t)
    if got.shape != ref.shape:
        return False
    tol = 1e-6 if link.scale == 1.0 else 1e-5
    return bool(np.allclose(got, ref.astype(np.float32), rtol=tol, atol=tol * (1 + float(np.abs(ref).max(initial=0)))))


def tensor_links(net: torch.nn.Module, proto: onnx.ModelProto) -> dict[str, Link]:
    """Verified links from torch tensors to ONNX initializers (unlinkable tensors are absent)."""
    nodes = unique_names(proto)
    inits = _init_arrays(proto)
    tensors: dict[str, tuple[torch.Tensor, bool]] = {n: (p, True) for n, p in net.named_parameters()}
    tensors.update({n: (b, False) for n, b in net.named_buffers() if n not in tensors})
    links: dict[str, Link] = {}

    def attr(node: onnx.NodeProto, name: str, default: Any) -> Any:
        for a in node.attribute:
            if a.name == name:
                return onnx.helper.get_attribute_value(a)
        return default

    def try_link(tname: str, mod: str, node: onnx.NodeProto, preferred: list[int]) -> None:
        t, is_param = tensors[tname]
        order = preferred + [i for i in range(len(node.input)) if i not in preferred]
        for i in order:
            if i >= len(node.input) or node.input[i] not in inits:
                continue
            init = inits[node.input[i]]
            cands = [("id", 1.0)]
            if node.op_type == "Gemm" and is_param:
                alpha = float(attr(node, "alpha", 1.0))
                beta = float(attr(node, "beta", 1.0))
                cands = [("gemm_w" if attr(node, "transB", 0) else "gemm_wT", alpha)] if i == 1 else [("gemm_c", beta)]
            for tr, sc in cands:
                ln = Link(tname, init.name, mod, node.op_type, tr, sc, is_param)
                if _matches(ln, t, init):
                    links[tname] = ln
                    return

    # module parameters and per-module buffers (BatchNorm running stats)
    for tname in tensors:
        if tname.startswith("initializers."):
            continue
        mod, _, leaf = tname.rpartition(".")
        node = nodes.get(mod)
        if node is None:
            continue
        pref = {"weight": [1], "bias": [2], "running_mean": [3], "running_var": [4]}.get(leaf, [])
        try_link(tname, mod, node, pref)

    # onnx2torch's initializer buffers: find who consumes them in the fx graph
    graph = getattr(net, "graph", None)
    if graph is not None:
        for fx_node in graph.nodes:
            if fx_node.op != "get_attr" or not str(fx_node.target).startswith("initializers."):
                continue
            tname = str(fx_node.target)
            if tname not in tensors:
                continue
            for user in fx_node.users:
                if user.op != "call_module" or str(user.target) not in nodes:
                    continue
                args = list(user.args)
                pos = [i for i, a in enumerate(args) if a is fx_node]
                try_link(tname, str(user.target), nodes[str(user.target)], pos)
                if tname in links:
                    break
    return links


def trainable_links(links: dict[str, Link]) -> dict[str, Link]:
    """The links safe to fine-tune: weights/biases of Conv/Gemm/MatMul/Add nodes whose
    initializer feeds only this one torch tensor (shared initializers stay frozen)."""
    users: dict[str, int] = {}
    for ln in links.values():
        users[ln.init_name] = users.get(ln.init_name, 0) + 1
    out = {}
    for k, ln in links.items():
        if ln.op_type not in TRAINABLE_OPS or users[ln.init_name] != 1:
            continue
        out[k] = ln
    return out


def named_tensors(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    d = dict(net.named_parameters())
    d.update({n: b for n, b in net.named_buffers() if n not in d})
    return d


# ---------------------------------------------------------------- the activation layer


@dataclass(frozen=True)
class Layer:
    """The activation the pruning and the filter look at.

    Attributes:
        value: the ONNX tensor name of the activation.
        module: the onnx2torch submodule to hook.
        hook: "input" (the module's input number `arg`) or "output".
        arg: which input of the module is the activation (hook == "input").
        last_node: ONNX name of the last linear node (penultimate layer) or of the chosen node.
        prune_module: module whose weights are zeroed to prune a neuron.
        prune_axis: "in" (zero the neuron's outgoing weights: columns of the next layer)
            or "out" (zero the producing layer's output channel/row and bias).
        description: for the report.
    """

    value: str
    module: str
    hook: str
    arg: int
    last_node: str
    prune_module: str | None
    prune_axis: str
    description: str


def find_layer(
    proto: onnx.ModelProto, net: torch.nn.Module, name: str | None = None, output: str | None = None
) -> Layer:
    """Locate the penultimate activation (default) or the output of node `name`.

    `output`: the class-score output the penultimate layer feeds (default: the graph's first
    output; a model with several outputs must name the one it was scanned with).

    Raises:
        ModelError / ConfigError: no linear last layer found, or `name` unknown.
    """
    nodes = unique_names(proto)
    modules = dict(net.named_modules())
    inits = _init_arrays(proto)
    producer: dict[str, tuple[str, onnx.NodeProto]] = {}
    for uname, n in nodes.items():
        for o in n.output:
            producer[o] = (uname, n)
    if name is None:
        cur = output or proto.graph.output[0].name
        seen = 0
        while cur in producer and seen < 50:
            seen += 1
            uname, n = producer[cur]
            if n.op_type in _LINEAR:
                data_pos = [i for i, v in enumerate(n.input) if v not in inits]
                if len(data_pos) != 1 or (n.op_type == "Gemm" and any(a.name == "transA" and a.i for a in n.attribute)):
                    break
                pos = data_pos[0]
                if uname not in modules:
                    break
                mod = modules[uname]
                arg = 0 if isinstance(mod, torch.nn.Linear) else pos
                return Layer(
                    value=n.input[pos], module=uname, hook="input", arg=arg, last_node=n.name or uname,
                    prune_module=uname, prune_axis="in",
                    description=f"input of the last linear layer {n.name or uname} ({n.op_type})",
                )
            if n.op_type not in _PASSTHROUGH:
                break
            # follow the data input (the one that is not an initializer)
            data = [v for v in n.input if v and v not in inits]
            if not data:
                break
            cur = data[0]
        raise ModelError(
            "cannot find the last linear (Gemm/MatMul) layer before the model's output; "
            "pass --layer NAME with the ONNX node whose output to use"
        )
    # explicit layer
    cand = None
    for uname, n in nodes.items():
        if name in (uname, n.name, n.name.lstrip("/")) or name in n.output:
            cand = (uname, n)
            break
    if cand is None:
        raise ConfigError(
            f"--layer {name!r} is not a node or tensor of the model; use an ONNX node name "
            "(e.g. /core/fc1/Gemm) or its output tensor name"
        )
    uname, n = cand
    if uname not in modules:
        raise ConfigError(f"--layer {name!r}: node {uname} has no torch counterpart to hook")
    # find the layer whose output channels are this activation's neurons
    walk = (uname, n)
    prune_mod = None
    for _ in range(10):
        wn = walk[1]
        if wn.op_type in ("Conv", "Gemm") and isinstance(modules.get(walk[0]), (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)):
            prune_mod = walk[0]
            break
        if wn.op_type not in ("Relu", "LeakyRelu", "Clip", "MaxPool", "AveragePool", "Identity", "Dropout"):
            break
        data = [v for v in wn.input if v and v not in inits]
        if not data or data[0] not in producer:
            break
        walk = producer[data[0]]
    return Layer(
        value=n.output[0], module=uname, hook="output", arg=0, last_node=n.name or uname,
        prune_module=prune_mod, prune_axis="out",
        description=f"output of {n.name or uname} ({n.op_type})",
    )


def zero_slices(tensors: dict[str, torch.Tensor], slices: Sequence[tuple[str, int, Sequence[int]]]) -> None:
    """Zero, in place, each (tensor name, axis, indices) slice: a pruned neuron's weights."""
    with torch.no_grad():
        for name, axis, idx in slices:
            t = tensors[name]
            t.index_fill_(axis, torch.as_tensor(list(idx), dtype=torch.long, device=t.device), 0.0)


# Activations a pruned channel may pass through on its way out of the last conv (the hooked
# output is the last of these right after the Conv, so a channel is judged as the next layer
# sees it: Fine-Pruning, Liu et al. 2018, prunes the last conv layer's post-activation channels).
_CHANNELWISE = ("Relu", "LeakyRelu", "Clip", "Elu", "Selu", "Sigmoid", "HardSigmoid", "HardSwish")
# More linear nodes than this after the last Conv: a transformer body, not a classifier head.
MAX_HEAD_LINEARS = 3


def find_last_conv(proto: onnx.ModelProto, net: torch.nn.Module) -> Layer | None:
    """The last convolution's channels (after its activation), where Fine-Pruning prunes; None
    when the model has no Conv, or when more than MAX_HEAD_LINEARS Gemm/MatMul nodes follow it
    (a ViT's only Conv is its patch embedding: the caller falls back to the penultimate layer)."""
    nodes = list(unique_names(proto).items())
    modules = dict(net.named_modules())
    convs = [i for i, (u, n) in enumerate(nodes) if n.op_type == "Conv" and isinstance(modules.get(u), torch.nn.Conv2d)]
    if not convs:
        return None
    last = convs[-1]
    if sum(n.op_type in _LINEAR for _, n in nodes[last + 1 :]) > MAX_HEAD_LINEARS:
        return None
    uname, node = nodes[last]
    consumers = [(u, n) for u, n in nodes if node.output[0] in n.input]
    if len(consumers) == 1 and consumers[0][1].op_type in _CHANNELWISE and consumers[0][0] in modules:
        uname, node = consumers[0]
    return find_layer(proto, net, uname)


@contextmanager
def capture(net: torch.nn.Module, layer: Layer) -> Iterator[list[torch.Tensor]]:
    """Record the layer's activation on every forward while the context is open."""
    mod = dict(net.named_modules())[layer.module]
    store: list[torch.Tensor] = []
    if layer.hook == "input":
        def pre(_m: Any, args: tuple[Any, ...], kwargs: dict[str, Any] | None = None) -> None:
            store.append(args[layer.arg])

        h = mod.register_forward_pre_hook(pre)
    else:
        def post(_m: Any, _a: Any, out: Any) -> None:
            store.append(out[0] if isinstance(out, (tuple, list)) else out)

        h = mod.register_forward_hook(post)
    try:
        yield store
    finally:
        h.remove()


def neuron_means(act: torch.Tensor) -> torch.Tensor:
    """Per-sample, per-neuron activation: [N, F] as is; [N, C, ...] averaged over space."""
    if act.dim() == 2:
        return act
    if act.dim() > 2:
        return act.flatten(2).mean(2)
    return act.reshape(act.shape[0], -1)


@torch.no_grad()
def activations(pm: torch.nn.Module, net: torch.nn.Module, layer: Layer, x: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """[N, neurons] activations of `layer` on [0,1] images x."""
    outs = []
    dev = next((b.device for b in pm.buffers()), torch.device("cpu"))
    old_vmap = getattr(pm, "use_vmap", None)
    if old_vmap is not None:
        pm.use_vmap = False  # hooks must see real tensors, not vmap's batched ones
    try:
        with capture(net, layer) as store:
            for i in range(0, len(x), batch):
                store.clear()
                pm(x[i : i + batch].to(dev))
                if not store:
                    raise ModelError(f"layer {layer.description} did not run in the forward pass")
                a = store[0] if len(store) == 1 else torch.cat(store, 0)
                outs.append(neuron_means(a.float()).cpu())
    finally:
        if old_vmap is not None:
            pm.use_vmap = old_vmap
    return torch.cat(outs, 0)

"""The ONNX artifact: the feature extractor written as an ONNX graph, node by node.

No maintained converter reaches ONNX from this project's JAX: `jax2tf` now always embeds
the computation as one serialised StableHLO op (`XlaCallModule`), which `tf2onnx` cannot
convert; `jax2onnx` requires an older orbax-checkpoint than the project pins; and there is
no maintained StableHLO -> ONNX converter. The models are small and fixed (MobileNet v1 or
ResNet-50 v1 in the TF-slim layout, and the DAL, LAM and GAM heads), so this module writes
their graph directly with `onnx.helper` from the same constants the flax modules use
(`models.mobilenet_v1`, `models.resnet_v1`, `models.heads`) and the restored variables.
Every export is checked against upm_jax's own features (`export.artifact`), and the tests
hold each backbone and head to the flax model.

The graph: uint8 frames [N, H, W, 3] -> float32 -> x / 127.5 - 1 -> NCHW -> the backbone
(each convolution with its inference BatchNorm folded in: W * a, beta - mean * a with
a = gamma / sqrt(var + eps); TF SAME or slim's symmetric padding as explicit pads) -> the
head -> float32 features [N, P, D] (several models: concatenated along D). Opset 17,
IR version 8 (read by onnxruntime 1.10 and later); N is symbolic. ONNX has no bfloat16
convolution: the graph of a bfloat16 model computes in float32 with its float32 weights
(`export.artifact` says when that is accepted).
"""
import numpy as np

from upm_jax.models import heads as heads_lib
from upm_jax.models import mobilenet_v1, resnet_v1
from upm_jax.models.registry import BACKBONES

OPSET = 17
IR_VERSION = 8
INPUT, OUTPUT = "frames", "features"


class _Graph:
    """Nodes and initializers of the graph being written; every value gets a fresh name."""

    def __init__(self):
        self.nodes, self.initializers, self._count = [], [], 0

    def _name(self, hint):
        self._count += 1
        return f"{hint}_{self._count}"

    def constant(self, value, hint="const"):
        from onnx import numpy_helper

        name = self._name(hint)
        self.initializers.append(numpy_helper.from_array(np.array(value, order="C"), name))
        return name

    def node(self, op_type, inputs, hint=None, **attributes):
        from onnx import helper

        out = self._name(hint or op_type)
        self.nodes.append(helper.make_node(op_type, list(inputs), [out], name=out, **attributes))
        return out

    def ints(self, values):
        return self.constant(np.asarray(values, np.int64), "ints")


def _f32(x):
    return np.asarray(x, np.float32)


def _pads(padding, size, kernel, stride):
    """(before, after) padding of one spatial axis: TF SAME, or slim conv2d_same
    (SYMMETRIC: explicit (k-1)//2 before, the rest after, for strided convs)."""
    if padding == "SYMMETRIC" and stride > 1:
        before = (kernel - 1) // 2
        return before, kernel - 1 - before
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def _conv_bn(g, x, hw, params, stats, *, stride, padding, epsilon, activation):
    """A layers.ConvBN at inference, BatchNorm folded into the convolution: NCHW x, spatial
    size hw -> (y, its spatial size)."""
    depthwise = "depthwise_kernel" in params
    if depthwise:  # [k, k, C, 1] -> OIHW [C, 1, k, k], one group per channel
        w = _f32(params["depthwise_kernel"])[:, :, :, 0].transpose(2, 0, 1)[:, None]
        groups = w.shape[0]
    else:  # HWIO -> OIHW
        w = _f32(params["kernel"]).transpose(3, 2, 0, 1)
        groups = 1
    k = w.shape[-1]
    bn, moving = params["BatchNorm"], stats["BatchNorm"]
    a = _f32(bn["scale"]) / np.sqrt(_f32(moving["var"]) + np.float32(epsilon))  # [Cout]
    weight = w * a[:, None, None, None]
    bias = _f32(bn["bias"]) - _f32(moving["mean"]) * a
    (top, bottom), (left, right) = (_pads(padding, hw[i], k, stride) for i in (0, 1))
    y = g.node("Conv", [x, g.constant(weight, "W"), g.constant(bias, "B")],
               kernel_shape=[k, k], strides=[stride, stride], pads=[top, left, bottom, right],
               group=groups)
    out_hw = tuple((hw[i] + p - k) // stride + 1
                   for i, p in ((0, top + bottom), (1, left + right)))
    if activation == "relu6":
        y = g.node("Clip", [y, g.constant(np.float32(0)), g.constant(np.float32(6))])
    elif activation == "relu":
        y = g.node("Relu", [y])
    return y, out_hw


def _mobilenet_v1(g, x, hw, params, stats):
    """models.mobilenet_v1.MobileNetV1: the stem and 13 depthwise-separable layers."""
    common = dict(padding="SAME", epsilon=mobilenet_v1.BN_EPSILON, activation="relu6")
    x, hw = _conv_bn(g, x, hw, params["Conv2d_0"], stats["Conv2d_0"], stride=2, **common)
    for i, (stride, _) in enumerate(mobilenet_v1.SEPARABLE_LAYERS, start=1):
        name = f"Conv2d_{i}_depthwise"
        x, hw = _conv_bn(g, x, hw, params[name], stats[name], stride=stride, **common)
        name = f"Conv2d_{i}_pointwise"
        x, hw = _conv_bn(g, x, hw, params[name], stats[name], stride=1, **common)
    return x, hw


def _resnet_v1_50(g, x, hw, params, stats):
    """models.resnet_v1.ResNetV1_50: 7x7/2 stem, 3x3/2 SAME max pool, four blocks of
    bottlenecks with the stride in the last unit's 3x3 convolution."""
    eps = resnet_v1.BN_EPSILON
    x, hw = _conv_bn(g, x, hw, params["conv1"], stats["conv1"], stride=2, padding="SYMMETRIC",
                     epsilon=eps, activation="relu")
    (top, bottom), (left, right) = (_pads("SAME", hw[i], 3, 2) for i in (0, 1))
    x = g.node("MaxPool", [x], kernel_shape=[3, 3], strides=[2, 2],
               pads=[top, left, bottom, right])  # padding never wins a max, as -inf
    hw = ((hw[0] + top + bottom - 3) // 2 + 1, (hw[1] + left + right - 3) // 2 + 1)
    channels = params["conv1"]["kernel"].shape[-1]
    for block, base, units, block_stride in resnet_v1.BLOCKS:
        for u in range(1, units + 1):
            p, s = params[block][f"unit_{u}"], stats[block][f"unit_{u}"]
            stride = block_stride if u == units else 1
            depth = 4 * base
            if channels == depth:  # slim subsample: x[:, :, ::stride, ::stride]
                shortcut = x if stride == 1 else g.node(
                    "Slice", [x, g.ints([0, 0]), g.ints([hw[0], hw[1]]), g.ints([2, 3]),
                              g.ints([stride, stride])])
            else:
                shortcut, _ = _conv_bn(g, x, hw, p["shortcut"], s["shortcut"], stride=stride,
                                       padding="SAME", epsilon=eps, activation=None)
            r, r_hw = _conv_bn(g, x, hw, p["conv1"], s["conv1"], stride=1, padding="SAME",
                               epsilon=eps, activation="relu")
            r, r_hw = _conv_bn(g, r, r_hw, p["conv2"], s["conv2"], stride=stride,
                               padding="SYMMETRIC", epsilon=eps, activation="relu")
            r, r_hw = _conv_bn(g, r, r_hw, p["conv3"], s["conv3"], stride=1, padding="SAME",
                               epsilon=eps, activation=None)
            x, hw, channels = g.node("Relu", [g.node("Add", [shortcut, r])]), r_hw, depth
    return x, hw


_BACKBONE_GRAPHS = {"mobilenet_v1": _mobilenet_v1, "resnet_v1_50": _resnet_v1_50}


def _stripes(g, fmap, hw, channels, n_part):
    """heads.stripe_pool: [N, C, h, w] -> [N, P, C], P stripes of h // P rows averaged."""
    rows = hw[0] // n_part
    if rows == 0:
        raise ValueError(f"a feature map of height {hw[0]} cannot be cut into n_part={n_part} "
                         "stripes")
    if rows * n_part != hw[0]:  # rows beyond P * (h // P) are dropped
        fmap = g.node("Slice", [fmap, g.ints([0]), g.ints([rows * n_part]), g.ints([2])])
    x = g.node("Reshape", [fmap, g.ints([0, channels, n_part, rows * hw[1]])])
    x = g.node("ReduceMean", [x], axes=[3], keepdims=0)  # [N, C, P]
    return g.node("Transpose", [x], perm=[0, 2, 1])


def _dal(g, fmap, hw, pooling):
    """heads.DALHead: slim AvgPool_1a (one window of min(h, 7) x min(w, 7)) or the mean."""
    if pooling == "slim_avgpool":
        kh, kw = (min(n, heads_lib.SLIM_AVGPOOL_MAX_KERNEL) for n in hw)
        if ((hw[0] - kh) // 2 + 1, (hw[1] - kw) // 2 + 1) != (1, 1):
            raise ValueError(f"the DAL MobileNet head needs a final map of at most 8x8, got "
                             f"{hw[0]}x{hw[1]}")
        if (kh, kw) != tuple(hw):
            fmap = g.node("Slice", [fmap, g.ints([0, 0]), g.ints([kh, kw]), g.ints([2, 3])])
    pooled = g.node("ReduceMean", [fmap], axes=[2, 3], keepdims=0)  # [N, C]
    return g.node("Unsqueeze", [pooled, g.ints([1])])  # [N, 1, C]


def _gam(g, fmap, hw, channels, n_part, params, stats, epsilon):
    """heads.GlobalHead at inference: output_i = relu6(BN(W_i [p'_i, g'])) + g'."""
    logits, moving = params["Logits"], stats.get("Logits", {})
    parts = _stripes(g, fmap, hw, channels, n_part)  # [N, P, C]
    whole = g.node("ReduceMean", [fmap], axes=[2, 3], keepdims=0)  # [N, C]

    def reduce(v, p):  # the 1x1 convolution with bias on a pooled vector: [N, C] -> [N, 256]
        return g.node("Gemm", [v, g.constant(_f32(p["kernel"])[0, 0], "W"),
                               g.constant(_f32(p["bias"]), "B")])

    whole = reduce(whole, logits["global"])
    outputs = []
    for i in range(n_part):
        part = g.node("Gather", [parts, g.constant(np.int64(i), "index")], axis=1)  # [N, C]
        joined = g.node("Concat", [reduce(part, logits[f"part_{i}"]), whole], axis=1)
        relation = logits[f"relation_{i}"]
        bn, bn_stats = relation["BatchNorm"], moving[f"relation_{i}"]["BatchNorm"]
        a = _f32(bn["scale"]) / np.sqrt(_f32(bn_stats["var"]) + np.float32(epsilon))
        r = g.node("Gemm", [joined, g.constant(_f32(relation["kernel"])[0, 0] * a, "W"),
                            g.constant(_f32(bn["bias"]) - _f32(bn_stats["mean"]) * a, "B")])
        r = g.node("Clip", [r, g.constant(np.float32(0)), g.constant(np.float32(6))])
        outputs.append(g.node("Unsqueeze", [g.node("Add", [r, whole]), g.ints([1])]))
    return outputs[0] if n_part == 1 else g.node("Concat", outputs, axis=1)  # [N, P, 256]


def _model_features(g, x, image_hw, model, variables):
    """One ReidModel's features [N, P, D] from the normalised NCHW input x."""
    spec = BACKBONES[model.backbone_name]
    params, stats = variables["params"], variables.get("batch_stats", {})
    fmap, hw = _BACKBONE_GRAPHS[model.backbone_name](g, x, image_hw, params["backbone"],
                                                     stats["backbone"])
    channels = spec.channels(model.depth_multiplier)
    if model.head_name == "dal":
        return _dal(g, fmap, hw, spec.dal_pooling)
    if model.head_name == "local":
        return _stripes(g, fmap, hw, channels, model.n_part)
    return _gam(g, fmap, hw, channels, model.n_part, params["head"], stats.get("head", {}),
                spec.bn_epsilon)


def build(models, image_hw, *, doc=""):
    """The onnx.ModelProto of `models` ([(ReidModel, variables)], features concatenated
    along D in this order) for uint8 frames of `image_hw` (H, W)."""
    import onnx
    from onnx import TensorProto, helper

    g = _Graph()
    x = g.node("Cast", [INPUT], to=TensorProto.FLOAT)
    x = g.node("Sub", [g.node("Div", [x, g.constant(np.float32(127.5))]),
                       g.constant(np.float32(1.0))])
    x = g.node("Transpose", [x], perm=[0, 3, 1, 2])  # NHWC -> NCHW
    features = [_model_features(g, x, image_hw, model, variables) for model, variables in models]
    out = features[0] if len(features) == 1 else g.node("Concat", features, axis=2)
    g.nodes.append(helper.make_node("Identity", [out], [OUTPUT], name=OUTPUT))
    parts = models[0][0].num_parts
    dim = sum(model.feature_dim for model, _ in models)
    graph = helper.make_graph(
        g.nodes, "upm_jax_features",
        [helper.make_tensor_value_info(INPUT, TensorProto.UINT8, ["N", image_hw[0], image_hw[1], 3])],
        [helper.make_tensor_value_info(OUTPUT, TensorProto.FLOAT, ["N", parts, dim])],
        g.initializers)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="upm_jax", doc_string=doc)
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    return proto


def write(extractor, path):
    """Writes the Extractor's features as an ONNX file at `path`; the format's details."""
    import jax
    import onnx
    import onnxruntime

    models = [(m.model, jax.tree.map(np.asarray, jax.device_get(m.variables)))
              for m in extractor.models]
    proto = build(models, extractor.image_shape,
                  doc="uint8 RGB frames [N, H, W, 3] -> float32 features [N, P, D] "
                      "(upm_jax; the JSON file beside this one describes both)")
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())
    ops = sorted({n.op_type for n in proto.graph.node})
    return {"opset": OPSET, "ir_version": IR_VERSION, "onnx": onnx.__version__,
            "checked_with": f"onnxruntime {onnxruntime.__version__} (CPUExecutionProvider)",
            "operators": ops, "compute_dtype": "float32",
            "batchnorm": "folded into the convolutions (W * a, beta - mean * a)"}


def open_artifact(path, threads=0):
    """A `uint8 [N, H, W, 3] -> float32 [N, P, D]` NumPy function running the ONNX file
    in onnxruntime on the CPU (`threads`: intra-op threads, 0 = onnxruntime's default)."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])

    def run(frames):
        return session.run([OUTPUT], {INPUT: np.ascontiguousarray(frames, np.uint8)})[0]

    return run

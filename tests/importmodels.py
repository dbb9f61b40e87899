"""Exported classifiers that differ from the project's own convention, built in the tests with ``onnx.helper``,
plus tiny labelled image folders they classify well.

The data: 3 classes of 8x8 RGB PNGs; in class k, colour channel k is bright (140-230) and the others dark
(20-120). Every model recovers x in [0, 1] NCHW from its own input convention, then computes
``logits = 12 * (I - 1/3) @ mean_hw(x) + b`` (accurate on the data). Each model's ``reference`` function is the
preprocessing a user of that model would write (independent of ``service.importing``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

CLASSES = ("a_red", "b_green", "c_blue")
SIZE = 8
MEAN = (120.0, 110.0, 100.0)
STD = (60.0, 50.0, 40.0)
_TYPES = {"float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16, "uint8": TensorProto.UINT8}


def class_images(k: int, n: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """uint8 (n, 3, size, size) images of class k (channel k mod 3 bright)."""
    x = rng.integers(20, 121, size=(n, 3, size, size))
    x[:, k % 3] = rng.integers(140, 231, size=(n, size, size))
    return x.astype(np.uint8)


def write_folder(root: Path, n_per_class: int = 24, seed: int = 0, classes: tuple[str, ...] = CLASSES) -> Path:
    """``root/<class>/<i>.png`` with the images of :func:`class_images` (class k = channel k)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(class_images(k, n_per_class, rng)):
            Image.fromarray(img.transpose(1, 2, 0)).save(root / name / f"{i:03d}.png")
    return root


@dataclass
class Variant:
    """One exported model's conventions (and the ``mixinfer import`` flags that describe them)."""

    name: str
    layout: str = "nchw"
    pixel_range: str = "0-1"
    normalised_outside: bool = False
    output: str = "logits"
    input_type: str = "float32"
    batch: int | str = "N"
    symbolic_size: bool = False
    flags: list[str] = field(default_factory=list)

    def cli_flags(self) -> list[str]:
        out = ["--input-layout", self.layout, "--pixel-range", self.pixel_range, "--output", self.output]
        if self.normalised_outside:
            out += ["--mean", ",".join(f"{m:g}" for m in MEAN), "--std", ",".join(f"{s:g}" for s in STD)]
        if self.symbolic_size:
            out += ["--input-size", f"{SIZE}x{SIZE}"]
        return out + self.flags

    def reference_input(self, images_u8: np.ndarray) -> np.ndarray:
        """What the user feeds the model: written out here, independently of the importer."""
        if self.input_type == "uint8":
            x = images_u8.copy()
        else:
            x = images_u8.astype(np.float32) / (255.0 if self.pixel_range == "0-1" else 1.0)
            if self.normalised_outside:
                x = (x - np.float32(MEAN).reshape(1, 3, 1, 1)) / np.float32(STD).reshape(1, 3, 1, 1)
            x = x.astype(self.input_type)
        return np.ascontiguousarray(x.transpose(0, 2, 3, 1) if self.layout == "nhwc" else x)


def _c(name: str, value: Any, dtype: Any = np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def build_model(
    v: Variant, extra_output: bool = False, hardcoded_reshape: bool = False, opset: int = 17
) -> onnx.ModelProto:
    """The ONNX model of variant ``v`` (opset 17 unless given)."""
    h: int | str = "h" if v.symbolic_size else SIZE
    w: int | str = "w" if v.symbolic_size else SIZE
    dims = [v.batch, 3, h, w] if v.layout == "nchw" else [v.batch, h, w, 3]
    nodes, inits = [], []
    cur = "input"
    if v.input_type != "float32":
        nodes.append(helper.make_node("Cast", [cur], ["x32"], to=TensorProto.FLOAT))
        cur = "x32"
    if v.normalised_outside:
        inits += [_c("std", STD), _c("mean", MEAN)]
        shape = (3,) if v.layout == "nhwc" else (3, 1, 1)
        inits[-2] = _c("std", np.reshape(STD, shape))
        inits[-1] = _c("mean", np.reshape(MEAN, shape))
        nodes += [helper.make_node("Mul", [cur, "std"], ["xs"]), helper.make_node("Add", ["xs", "mean"], ["xm"])]
        cur = "xm"
    if v.pixel_range == "0-255":
        inits.append(_c("k255", 255.0))
        nodes.append(helper.make_node("Div", [cur, "k255"], ["x01"]))
        cur = "x01"
    if v.layout == "nhwc":
        nodes.append(helper.make_node("Transpose", [cur], ["xnchw"], perm=[0, 3, 1, 2]))
        cur = "xnchw"
    nodes.append(helper.make_node("GlobalAveragePool", [cur], ["pooled"]))
    if hardcoded_reshape:
        inits.append(_c("one_by_3", [1, 3], np.int64))
        nodes.append(helper.make_node("Reshape", ["pooled", "one_by_3"], ["features"]))
    else:
        nodes.append(helper.make_node("Flatten", ["pooled"], ["features"], axis=1))
    inits += [_c("fc_w", 12.0 * (np.eye(3) - 1.0 / 3.0)), _c("fc_b", [0.1, 0.0, -0.1])]
    nodes.append(helper.make_node("Gemm", ["features", "fc_w", "fc_b"], ["scores"], transB=1))
    out = "scores"
    if v.output == "probabilities":
        nodes.append(helper.make_node("Softmax", ["scores"], ["probs"], axis=1))
        out = "probs"
    outputs = [helper.make_tensor_value_info(out, TensorProto.FLOAT, [v.batch, 3])]
    if extra_output:
        outputs.append(helper.make_tensor_value_info("features", TensorProto.FLOAT, [v.batch, 3]))
    graph = helper.make_graph(
        nodes, v.name, [helper.make_tensor_value_info("input", _TYPES[v.input_type], dims)], outputs, initializer=inits
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def build_grey_model(size: int = SIZE) -> onnx.ModelProto:
    """A 1-channel NHWC model taking 0-255 pixels: class k is brightness level (0.2, 0.5, 0.8)[k] of the image."""
    nodes = [
        helper.make_node("Transpose", ["input"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Div", ["nchw", "k255"], ["x01"]),
        helper.make_node("GlobalAveragePool", ["x01"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["m"], axis=1),
        helper.make_node("Sub", ["m", "centres"], ["d"]),
        helper.make_node("Mul", ["d", "d"], ["d2"]),
        helper.make_node("Mul", ["d2", "sharp"], ["scores"]),
    ]
    inits = [_c("k255", 255.0), _c("centres", [0.2, 0.5, 0.8]), _c("sharp", -60.0)]
    graph = helper.make_graph(
        nodes,
        "grey",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", size, size, 1])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 3])],
        initializer=inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    return model


def write_grey_folder(root: Path, n_per_class: int = 12, seed: int = 0) -> Path:
    """``root/<level>/<i>.png`` greyscale images around brightness 0.2, 0.5, 0.8."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, level in enumerate((0.2, 0.5, 0.8)):
        (root / f"level{k}").mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            img = np.clip(rng.normal(255 * level, 20, size=(SIZE, SIZE)), 0, 255).astype(np.uint8)
            Image.fromarray(img, "L").save(root / f"level{k}" / f"{i:03d}.png")
    return root


def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.save_model(model, str(path))
    return path


def reference_probs(v: Variant, model_path: Path, images_u8: np.ndarray) -> np.ndarray:
    """The original model's probabilities, fed one image at a time as the user would."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    name, out = sess.get_inputs()[0].name, sess.get_outputs()[0].name
    x = v.reference_input(images_u8)
    z = np.concatenate([sess.run([out], {name: x[i : i + 1]})[0] for i in range(len(x))]).astype(np.float64)
    if v.output == "probabilities":
        return z
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


#: models that differ from the project's convention in every option the importer offers
VARIANTS = [
    Variant("nhwc-outside-norm", layout="nhwc", normalised_outside=True),
    Variant("pixels-0-255", pixel_range="0-255"),
    Variant("softmax-inside", output="probabilities"),
    Variant("float16-input", input_type="float16"),
    Variant("uint8-input", input_type="uint8", pixel_range="0-255"),
    Variant("fixed-batch-1", batch=1),
    Variant("symbolic-size", symbolic_size=True),
]


def import_args(model: Path, data: Path, store: Path, name: str, *flags: str) -> list[str]:
    """``mixinfer import`` arguments for an image folder."""
    return ["import", "--onnx", str(model), "--dataset", "imagefolder", "--data-dir", str(data), "--name", name,
            "--store", str(store), *flags]  # fmt: skip


def import_variant(v: Variant, root: Path, data: Path, store: Path, **build: Any) -> Path:
    """Build, save and import variant ``v``; returns the bundle directory (asserts exit code 0)."""
    from service.cli import main

    path = save(build_model(v, **build), root / f"{v.name}.onnx")
    rc = main(import_args(path, data, store, v.name, *v.cli_flags()))
    assert rc == 0, f"import of {v.name} failed with exit code {rc}"
    return store / v.name / "1"

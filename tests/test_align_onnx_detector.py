"""The ``onnx`` detector (SCRFD output layout) on tiny hand-built ONNX models whose outputs are
constants encoding known faces; the expected boxes and points are decoded here by hand."""

from __future__ import annotations

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper  # noqa: E402

from partialfc.align import faces  # noqa: E402
from partialfc.align.onnx_detector import OnnxDetector  # noqa: E402
from partialfc.errors import ConfigError, InputNotFoundError  # noqa: E402

SIZE = 640
STRIDES, ANCHORS = (8, 16, 32), 2

# (stride, x, y, anchor, score, distances (4,), keypoint offsets (10,)), in stride units
FACE_A = (8, 20, 15, 1, 0.9, (3.0, 4.0, 5.0, 6.0), (-1.5, -1.0, 1.5, -1.0, 0.0, 0.5, -1.0, 2.0, 1.0, 2.0))
FACE_B = (16, 25, 10, 0, 0.8, (2.5, 3.0, 2.5, 3.5), (-1.0, -1.25, 1.0, -1.0, 0.25, 0.5, -0.75, 2.0, 0.75, 2.25))
DUPLICATE = (8, 21, 15, 0, 0.7, (4.1, 4.0, 3.9, 6.0), (0.0,) * 10)  # box nearly A's: NMS removes it
DECOY = (32, 5, 3, 1, 0.49, (1.0, 1.0, 1.0, 1.0), (0.0,) * 10)  # below the 0.5 threshold
ENCODED = (FACE_A, FACE_B, DUPLICATE, DECOY)


def scrfd_outputs(batched: bool = False) -> list[np.ndarray]:
    """The 9 output constants: scores, box distances, keypoints, per stride 8, 16, 32."""
    arrays = {kind: [np.zeros(((SIZE // s) ** 2 * ANCHORS, width), np.float32) for s in STRIDES]
              for kind, width in (("score", 1), ("box", 4), ("kps", 10))}
    for stride, x, y, anchor, score, dist, kps in ENCODED:
        level = STRIDES.index(stride)
        row = (y * (SIZE // stride) + x) * ANCHORS + anchor
        arrays["score"][level][row] = score
        arrays["box"][level][row] = dist
        arrays["kps"][level][row] = kps
    out = arrays["score"] + arrays["box"] + arrays["kps"]
    return [a[None] for a in out] if batched else out


def save_model(path, outputs: list[np.ndarray], dynamic: bool = False) -> str:
    """An ONNX file: input (1, 3, 640, 640) (or dynamic dims), outputs = constants + 0 * mean(input)."""
    dims = ["batch", 3, "height", "width"] if dynamic else [1, 3, SIZE, SIZE]
    nodes = [helper.make_node("ReduceMean", ["input"], ["mean"], keepdims=0),
             helper.make_node("Mul", ["mean", "zero"], ["nothing"])]
    inits = [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])]
    infos = []
    for i, array in enumerate(outputs):
        inits.append(helper.make_tensor(f"const{i}", TensorProto.FLOAT, array.shape, array.ravel()))
        nodes.append(helper.make_node("Add", [f"const{i}", "nothing"], [f"out{i}"]))
        infos.append(helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, list(array.shape)))
    graph = helper.make_graph(nodes, "scrfd_stub", [helper.make_tensor_value_info("input", TensorProto.FLOAT, dims)],
                              infos, initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def expected(face, det_scale: float) -> tuple[np.ndarray, np.ndarray]:
    """Box (4,) and points (5, 2) of an encoded face in photo pixels, decoded by hand."""
    stride, x, y, _, _, (d0, d1, d2, d3), kps = face
    cx, cy = x * stride, y * stride
    box = np.array([cx - d0 * stride, cy - d1 * stride, cx + d2 * stride, cy + d3 * stride])
    points = np.array([[cx + kps[2 * k] * stride, cy + kps[2 * k + 1] * stride] for k in range(5)])
    return box / det_scale, points / det_scale


@pytest.mark.parametrize("dynamic, batched", [(False, False), (True, True)])
def test_decodes_known_faces(tmp_path, dynamic, batched):
    detector = OnnxDetector(save_model(tmp_path / "det.onnx", scrfd_outputs(batched), dynamic))
    photo = np.random.default_rng(0).integers(0, 256, (320, 480, 3), dtype=np.uint8)
    det_scale = 426 / 320  # 480 wide -> 640, 320 high -> int(640 * 320 / 480) = 426
    found = detector.detect(photo)
    assert len(found) == 2
    for face, encoded in zip(found, (FACE_A, FACE_B)):
        box, points = expected(encoded, det_scale)
        np.testing.assert_allclose(face.box, box, atol=1e-3)
        np.testing.assert_allclose(face.points, points, atol=1e-3)
        assert face.score == pytest.approx(encoded[4], abs=1e-6)


def test_lower_threshold_keeps_the_decoy(tmp_path):
    detector = OnnxDetector(save_model(tmp_path / "det.onnx", scrfd_outputs()), threshold=0.45)
    found = detector.detect(np.zeros((640, 640, 3), np.uint8))  # det_scale 1
    assert [round(f.score, 2) for f in found] == [0.9, 0.8, 0.49]
    np.testing.assert_allclose(found[2].box, expected(DECOY, 1.0)[0], atol=1e-3)


def test_missing_model(tmp_path):
    with pytest.raises(InputNotFoundError, match="nothing.onnx"):
        OnnxDetector(str(tmp_path / "nothing.onnx"))


def test_model_without_keypoints(tmp_path):
    path = save_model(tmp_path / "nokps.onnx", scrfd_outputs()[:6])
    with pytest.raises(ConfigError, match="nokps.onnx.*6 outputs.*five points"):
        OnnxDetector(path)


def test_build_detector_by_name(tmp_path, monkeypatch):
    # only this module's registration: the other detector modules may need packages not installed here
    monkeypatch.setattr(faces, "DETECTOR_MODULES", ("partialfc.align.onnx_detector",))
    path = save_model(tmp_path / "det.onnx", scrfd_outputs())
    detector = faces.build_detector("onnx", model=path, threshold=0.6)
    assert isinstance(detector, OnnxDetector)
    assert [round(f.score, 2) for f in detector.detect(np.zeros((64, 64, 3), np.uint8))] == [0.9, 0.8]

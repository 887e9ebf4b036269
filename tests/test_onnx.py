"""Out of partialfc: insightface weights imported, exported to ONNX (checked by the command
itself) and to safetensors; onnxruntime computes the reference network's embeddings; the
eval commands take the ONNX model; an output the command cannot write is one error line."""

import json

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from partialfc.cli import main
from partialfc.data.synthetic import write_verification_pairs
from partialfc.eval.export import read_exported
from partialfc.train.artifacts import load_backbone
from tests.insightface_reference import randomised, reference

pytestmark = pytest.mark.required


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """An arcface_torch mobilefacenet (random weights), imported and exported to ONNX by the
    CLI; returns (folder, reference network, the command's output)."""
    folder = tmp_path_factory.mktemp("onnx")
    ref = randomised(reference("mbf", 64))
    torch.save(ref.state_dict(), folder / "insightface.pt")
    assert main(["export", "import-insightface", str(folder / "insightface.pt"), str(folder / "bb.pt"),
                 "--backbone", "mbf"]) == 0
    return folder, ref


def test_onnxruntime_equals_the_reference_network_at_batch_1_and_8(exported, capsys):
    folder, ref = exported
    assert main(["export", "onnx", str(folder / "bb.pt"), str(folder / "bb.onnx")]) == 0
    printed = capsys.readouterr().out
    assert "opset 18" in printed and "batch 1:" in printed and "batch 8:" in printed
    graph = onnx.load(str(folder / "bb.onnx"))
    assert {o.domain: o.version for o in graph.opset_import}[""] == 18
    assert graph.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # symbolic batch
    session = onnxruntime.InferenceSession(str(folder / "bb.onnx"), providers=["CPUExecutionProvider"])
    g = torch.Generator().manual_seed(3)
    for batch in (1, 8):
        x = torch.randn(batch, 3, 112, 112, generator=g)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        with torch.no_grad():
            want = ref(x).numpy()
        assert got.shape == (batch, 64)
        assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max()


def test_safetensors_export_reads_back_as_the_same_backbone(exported):
    folder, ref = exported
    assert main(["export", "safetensors", str(folder / "bb.pt"), str(folder / "bb.safetensors")]) == 0
    record, original = read_exported(str(folder / "bb.safetensors")), read_exported(str(folder / "bb.pt"))
    assert (record["backbone"], record["embedding_size"], record["options"]) == ("mobilefacenet", 64, {})
    assert sorted(record["state_dict"]) == sorted(original["state_dict"])  # safetensors sorts names
    assert all(torch.equal(record["state_dict"][k], v) for k, v in original["state_dict"].items())
    x = torch.randn(2, 3, 112, 112)
    with torch.no_grad():
        assert torch.equal(load_backbone(str(folder / "bb.safetensors"))(x), ref(x))


@pytest.mark.parametrize("command, out", [("backbone", "x.onnx"), ("backbone", "x.zip"), ("safetensors", "x.pt"),
                                          ("onnx", "x.pt"), ("import-insightface", "x.onnx")])
def test_an_output_suffix_the_command_cannot_write_is_one_error_line(exported, capsys, command, out):
    folder, _ = exported
    source = folder / ("insightface.pt" if command == "import-insightface" else "bb.pt")
    extra = ["--backbone", "mbf"] if command == "import-insightface" else []
    assert main(["export", command, str(source), str(folder / out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write {folder / out}") and err.count("\n") == 1
    assert not (folder / out).exists()


def test_eval_verify_with_onnx_equals_the_checkpoint(exported, capsys):
    folder, _ = exported
    if not (folder / "bb.onnx").exists():
        assert main(["export", "onnx", str(folder / "bb.pt"), str(folder / "bb.onnx")]) == 0
    write_verification_pairs(str(folder / "pairs.bin"), num_identities=4, num_pairs=20, workers=1)
    capsys.readouterr()
    results = []
    for which in (["--checkpoint", str(folder / "bb.pt")], ["--onnx", str(folder / "bb.onnx")]):
        assert main(["eval", "verify", *which, "--bin", str(folder / "pairs.bin"), "--json"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    torch_result, onnx_result = results
    assert onnx_result["num_pairs"] == torch_result["num_pairs"] == 20
    assert onnx_result["accuracy"] == pytest.approx(torch_result["accuracy"], abs=0.051)
    assert onnx_result["threshold"] == pytest.approx(torch_result["threshold"], abs=0.05)

"""The README's main command: `qtrace demo` exports the embedded default and checks it."""

import os

from qtrace.cli import main


def test_demo_exports_and_generates_the_same_tokens_as_numpy(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "-o", str(out), "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert "tokens match" in printed
    assert sorted(os.listdir(out)) == ["compile.sh", "custom_io.yaml", "model.onnx", "model.onnx.data",
                                       "specializations.json"]
    onnx_line = next(line for line in printed.splitlines() if line.startswith("onnxruntime:"))
    numpy_line = next(line for line in printed.splitlines() if line.startswith("eager numpy:"))
    onnx_tokens = onnx_line.split("[", 1)[1].split("]", 1)[0]
    numpy_tokens = numpy_line.split("[", 1)[1].split("]", 1)[0]
    assert onnx_tokens == numpy_tokens and len(onnx_tokens.split(",")) == 4

"""qtrace against the peer's path (torch -> TorchScript -> ONNX) on the same Llama configs.

QEfficient itself is not on PyPI, so the baseline is the exporter it is built on: torch.onnx.export
(TorchScript, opset 17) of transformers' LlamaForCausalLM, without a KV cache and without
QEfficient's own transforms — a lower bound for the peer's graph size and export time. qtrace
exports the full Cloud AI 100 interface (KV cache in, retained state out, custom ops).

    python benchmarks/bench_vs_torch_export.py        # needs torch and transformers installed

Prints export seconds and ONNX node counts for both, and the ratios.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from qtrace.examples.checkpoint import export_model, random_model  # noqa: E402
from qtrace.examples.families.llama import tiny_config  # noqa: E402

CONFIGS = {
    "tiny (2 layers, hidden 64)": dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=16),
    "small (8 layers, hidden 512)": dict(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                                         head_dim=64),
}


def onnx_node_count(path: str) -> tuple[int, int]:
    """(nodes in the main graph, nodes with every local function call inlined)."""
    import onnx

    model = onnx.load(path, load_external_data=False)

    def expanded(nodes) -> int:
        total = 0
        for node in nodes:
            body = next((f for f in model.functions if f.name == node.op_type and f.domain == node.domain), None)
            total += expanded(body.node) if body is not None and not node.domain.startswith("com.") else 1
        return total

    return len(model.graph.node), expanded(model.graph.node)


def bench_qtrace(config: dict[str, Any], tmp: str) -> dict[str, float]:
    model = random_model(config)
    start = time.perf_counter()
    export_model(model, os.path.join(tmp, "qtrace"), ctx_len=128, prefill_seq_len=32)
    seconds = time.perf_counter() - start
    main, inlined = onnx_node_count(os.path.join(tmp, "qtrace", "model.onnx"))
    return {"seconds": seconds, "main": main, "inlined": inlined}


def bench_torch(config: dict[str, Any], tmp: str, dynamo: bool) -> dict[str, float]:
    import torch
    import transformers

    hf_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures",)})
    hf_config.use_cache = False
    model = transformers.LlamaForCausalLM(hf_config).eval()
    ids = torch.zeros((1, 32), dtype=torch.int64)
    path = os.path.join(tmp, "torch.onnx")
    start = time.perf_counter()
    with torch.no_grad():
        torch.onnx.export(model, (ids,), path, input_names=["input_ids"], output_names=["logits"], opset_version=17,
                          dynamic_axes=None if dynamo else {"input_ids": {0: "batch_size", 1: "seq_len"}}, dynamo=dynamo)
    seconds = time.perf_counter() - start
    main, inlined = onnx_node_count(path)
    return {"seconds": seconds, "main": main, "inlined": inlined}


def main() -> None:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        print("skipped: this benchmark needs torch and transformers (pip install torch transformers)")
        return
    print(f"{'config':<30} {'exporter':<22} {'seconds':>8} {'nodes (main)':>13} {'nodes (inlined)':>16}")
    for name, overrides in CONFIGS.items():
        cfg = tiny_config(**overrides)
        with tempfile.TemporaryDirectory() as tmp:
            ours = bench_qtrace(cfg, tmp)
            results = {}
            for label, dynamo in (("torch TorchScript", False), ("torch dynamo", True)):
                try:
                    results[label] = bench_torch(cfg, tmp, dynamo)
                except Exception as exc:  # the peer failing is a result too
                    results[label] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
        print(f"{name:<30} {'qtrace (KV, custom ops)':<22} {ours['seconds']:8.2f} {ours['main']:13d} {ours['inlined']:16d}")
        for label, theirs in results.items():
            if isinstance(theirs, str):
                print(f"{'':<30} {label + ' (no KV)':<22} {theirs}")
                continue
            print(f"{'':<30} {label + ' (no KV)':<22} {theirs['seconds']:8.2f} {theirs['main']:13d} "
                  f"{theirs['inlined']:16d}")
            print(f"{'':<30} {'  ratio to qtrace':<22} {theirs['seconds'] / ours['seconds']:7.1f}x "
                  f"{theirs['main'] / ours['main']:12.1f}x {theirs['inlined'] / ours['inlined']:15.1f}x")

if __name__ == "__main__":
    main()

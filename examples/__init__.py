"""Example models written for qtrace (installed as `qtrace.examples`): `llama` (Llama, Mistral,
Qwen2 causal LMs in Cloud AI 100 form), `checkpoint` (Hugging Face checkpoints in, exports out) and
`generation` (greedy decoding on onnxruntime or eagerly on numpy)."""

"""The model zoo (installed as `qtrace.examples`): causal LMs written as pure functions for qtrace.

- `blocks/`: the shared pieces (KV cache, step masks, RoPE, cached attention, norms, MLPs, the
  causal-LM driver and its QEfficient signature);
- `families/`: one short module per model family, each registering its Hugging Face architectures;
- `registry`: architecture name -> config reader, weight map, layer function;
- `checkpoint`: safetensors checkpoints in, Cloud AI 100 exports out;
- `generation`: greedy decoding on onnxruntime (or eagerly on numpy), as QEfficient's runtime drives it;
- `numpy_decoder`: a decoder written with plain numpy operators, which qtrace's fusion pass rewrites.
"""

"""One module per model family. Each registers its architectures with `qtrace.examples.registry`
when imported; the registry imports every module here on first use."""

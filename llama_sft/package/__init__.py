"""Packaging: what may go into a package, its generated files, the build, exports (merged model,
GGUF) and the hub upload. The archive format itself is ``llama_sft.adapter.archive``."""

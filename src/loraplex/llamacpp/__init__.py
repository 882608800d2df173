"""llama.cpp and Ollama: adapters as GGUF LoRA files, merged models as GGUF, Ollama Modelfiles, and the check that
llama.cpp (through llama-cpp-python) computes what loraplex computes (`lora`, `merged`, `modelfile`, `verify`,
`export`)."""

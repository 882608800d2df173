"""An Ollama Modelfile per adapter: FROM the base GGUF, ADAPTER its LoRA file, and the chat template, system prompt
and stop token the adapter trained with.

Ollama's TEMPLATE is a Go template, not the tokenizer's Jinja one: the two template families loraplex trains with
(ChatML, Llama-3 headers) are written out in Go below, rendering the same text as the Jinja templates
(`FALLBACK_TEMPLATES`) for the messages a request holds. Ollama puts SYSTEM first when a request has no system
message, as the training rows had the dataset's `system`.
"""
from __future__ import annotations

from pathlib import Path

GO_TEMPLATES = {
    "chatml": ("{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
               "{{ end }}<|im_start|>assistant\n"),
    "llama3": ("<|begin_of_text|>{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
               "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n"),
}
FAMILY_MARKERS = {"chatml": "<|im_start|>", "llama3": "<|start_header_id|>"}


def template_family(jinja: str) -> str | None:
    """Which Go template renders like this Jinja chat template (None: neither family)."""
    return next((name for name, marker in FAMILY_MARKERS.items() if marker in jinja), None)


def _quoted(text: str) -> str:
    """A Modelfile value in triple quotes (Ollama has no escape for them: refuse what would end the value)."""
    if '"""' in text:
        raise ValueError(f'a Modelfile value cannot hold """: {text[:60]!r}')
    return f'"""{text}"""'


def modelfile_text(name: str, run_dir: Path, base: str, lora_file: str, chat_template: str, system: str | None,
                   stop: list[str]) -> str:
    """The Modelfile; `lora_file` relative to the Modelfile's folder (Ollama resolves it from there)."""
    family = template_family(chat_template)
    base_note = ("the base GGUF file the adapter was trained on (loraplex de-quantized it to train)"
                 if base.endswith(".gguf") else "the base model folder (Ollama imports safetensors folders)")
    lines = [f"# Ollama Modelfile for the adapter {name} of the run {run_dir}, written by `loraplex export gguf`",
             f"# create the model with: ollama create {name} -f Modelfile   (run it in this folder)",
             f"# FROM: {base_note}", f"FROM {base}", f"ADAPTER {lora_file}"]
    if family:
        lines.append(f"TEMPLATE {_quoted(GO_TEMPLATES[family])}")
    else:
        lines.insert(2, "# no TEMPLATE: the adapter's chat template is neither ChatML nor Llama-3; Ollama uses the "
                        "base GGUF's own template, which may differ from the one the adapter trained with")
    if system:
        lines.append(f"SYSTEM {_quoted(system)}")
    lines += [f'PARAMETER stop "{token}"' for token in stop]
    return "\n".join(lines) + "\n"

"""Chat-template rendering and answer-only labels.

A conversation is rendered with the tokenizer's own chat template (or a named fallback) and cut into
segments at each assistant turn: the prompt up to the generation prompt is context (label -100), the
assistant's content plus its end-of-turn token is trained on. Segments are tokenized one by one, so the
trained tokens are exactly the tokens the model must generate after the generation prompt.
"""
from __future__ import annotations

from dataclasses import dataclass

from jinja2 import TemplateError

IGNORE_INDEX = -100

FALLBACK_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ '<|begin_of_text|>' }}"
        "{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim"
        " + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
    ),
}
# what each fallback template needs the tokenizer to hold as single (special) tokens
TEMPLATE_MARKERS = {"chatml": ("<|im_start|>", "<|im_end|>"),
                    "llama3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")}
END_OF_TURN_CANDIDATES = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>", "</s>")


def chat_template_for(tokenizer, name: str | None = None) -> str:
    """The template to render with: a named fallback if asked, else the tokenizer's, else ChatML."""
    if name:
        return FALLBACK_TEMPLATES[name]
    return tokenizer.chat_template or FALLBACK_TEMPLATES["chatml"]


def missing_markers(tokenizer, name: str) -> list[str]:
    """The fallback template's turn markers that the tokenizer would split into several ordinary tokens."""
    return [m for m in TEMPLATE_MARKERS[name] if len(tokenizer(m, add_special_tokens=False)["input_ids"]) != 1]


def template_problems(datasets: list, tokenizer, model_name: str) -> list[str]:
    """One line per dataset whose fallback template's markers are not tokens of this tokenizer.

    Such a marker would become several ordinary tokens that the adapter is trained to write, and generation
    would never see the end-of-turn token it stops on.
    """
    problems = []
    for spec in datasets:
        name = spec.template or (None if tokenizer.chat_template else "chatml")
        missing = missing_markers(tokenizer, name) if name else []
        if not missing:
            continue
        chosen = (f"template: {name}" if spec.template else
                  f"the tokenizer has no chat template, and the {name} fallback")
        problems.append(f"datasets[{spec.name}]: {chosen} marks turns with {', '.join(missing)}, which the tokenizer "
                        f"of {model_name} does not hold as tokens (each would be split into ordinary tokens and "
                        "trained on); use the template whose special tokens this tokenizer has"
                        + (", or remove template: to use the tokenizer's own chat template"
                           if spec.template and tokenizer.chat_template else
                           ", or a base model whose tokenizer has a chat template"))
    return problems


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    full_length: int  # before truncation

    @property
    def answer_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def render_segments(tokenizer, messages: list[dict[str, str]], template: str) -> list[tuple[str, bool]]:
    """Split the rendered conversation into (text, trained) segments; raise ValueError if impossible."""
    def render(msgs, generation_prompt):
        try:
            return tokenizer.apply_chat_template(msgs, chat_template=template, tokenize=False,
                                                 add_generation_prompt=generation_prompt)
        except TemplateError as exc:  # raise_exception() in the template, a syntax error, a sandbox violation
            reason = f"{type(exc).__name__}: {str(exc).rstrip('.')}"
            raise ValueError(f"the chat template refused this conversation ({reason}); fix the row, or set "
                             "template: chatml (or llama3) for this dataset") from None

    segments: list[tuple[str, bool]] = []
    done = ""
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(messages[:i], True)
        full = render(messages[: i + 1], False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise ValueError("the chat template renders earlier turns differently once later turns follow; "
                             "set template: chatml (or llama3) for this dataset")
        answer = full[len(prompt):]
        cut = _end_of_turn(answer, message["content"], tokenizer)
        segments += [(prompt[len(done):], False), (answer[:cut], True)]
        done = prompt + answer[:cut]
    return [(text, trained) for text, trained in segments if text]


def _end_of_turn(answer: str, content: str, tokenizer) -> int:
    """Index just past the end-of-turn marker that follows the content (whitespace after it is context)."""
    start = answer.find(content.strip()) + len(content.strip()) if content.strip() in answer else 0
    candidates = [tokenizer.eos_token] if tokenizer.eos_token else []
    for marker in candidates + [m for m in END_OF_TURN_CANDIDATES if m not in candidates]:
        index = answer.find(marker, start)
        if index >= 0:
            return index + len(marker)
    return len(answer)


def end_of_turn_ids(tokenizer, template: str) -> set[int]:
    """The special token that ends an assistant turn under `template`: the last token an adapter trained with
    that template learned to write (`<|eot_id|>` for llama3, even on a base whose eos is `<|end_of_text|>`)."""
    messages = [{"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}]
    try:
        trained = [text for text, is_trained in render_segments(tokenizer, messages, template) if is_trained]
    except ValueError:
        return set()
    ids = tokenizer(trained[-1], add_special_tokens=False)["input_ids"] if trained else []
    return {ids[-1]} if ids and ids[-1] in set(tokenizer.all_special_ids) else set()


def encode(tokenizer, messages: list[dict[str, str]], template: str, max_seq_length: int) -> Encoded:
    input_ids: list[int] = []
    labels: list[int] = []
    for text, trained in render_segments(tokenizer, messages, template):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if trained else [IGNORE_INDEX] * len(ids)
    full = len(input_ids)
    return Encoded(input_ids[:max_seq_length], labels[:max_seq_length], full)


def prompt_text(tokenizer, messages: list[dict[str, str]], template: str) -> str:
    """The text a model sees before it answers the last assistant turn (for generation)."""
    context = messages[:-1] if messages and messages[-1]["role"] == "assistant" else messages
    return tokenizer.apply_chat_template(context, chat_template=template, tokenize=False, add_generation_prompt=True)

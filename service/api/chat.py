"""Chat messages to prompt token ids: the model's chat template when its tokenizer has one (rendered in a
sandbox, as transformers does), else the DialoGPT convention: each turn's text followed by EOS, so the
model continues with the next (assistant) turn.
"""

from functools import lru_cache

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import invalid
from .protocol import encode
from .schemas import ChatMessage


@lru_cache(maxsize=8)
def _template(source: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(source)


def chat_prompt(messages: list[ChatMessage], backend) -> list[int]:
    tokenizer = backend.loaded.tokenizer
    info = backend.loaded.manifest.tokenizer
    eos_id = info.eos_token_id
    eos = tokenizer.id_to_token(eos_id) if eos_id is not None else None
    if info.chat_template:
        try:
            text = _template(info.chat_template).render(
                messages=[m.model_dump() for m in messages],
                add_generation_prompt=True,
                eos_token=eos or "",
                bos_token=eos or "",
            )
        except (TemplateError, ArithmeticError, LookupError, TypeError, ValueError) as exc:
            # A sandbox refusal (SecurityError is a TemplateError), an over-long range() (OverflowError), a
            # template indexing or calling what these messages lack: the template cannot render them.
            raise invalid(f"the model's chat template failed on these messages: {exc}", "messages") from None
        ids = encode(tokenizer, text)
    else:
        if eos_id is None:
            raise invalid("this model has neither a chat template nor an EOS token to join turns", "messages")
        ids = []
        for message in messages:
            ids += encode(tokenizer, message.content) + [eos_id]
    if not ids:
        raise invalid("the messages encode to no tokens", "messages")
    return ids

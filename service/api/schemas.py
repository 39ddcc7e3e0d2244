"""Request bodies of every endpoint (pydantic), as clients send them: unknown fields ignored, NaN and
Infinity refused, ranges that do not depend on the model or the configuration checked here. Rules that
do (context length, vocabulary, `n` and stop limits) are checked where requests become engine requests.
"""

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt
from pydantic import StrictStr as _StrictStr


def _encodable(text: str) -> str:
    """JSON may carry lone surrogates (\\ud800) that are no Unicode text: refuse them here, not in the
    tokenizer."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("the text contains an unpaired surrogate (invalid Unicode)") from None
    return text


StrictStr = Annotated[_StrictStr, AfterValidator(_encodable)]

TokenIds = list[StrictInt]
Prompt = StrictStr | list[StrictStr] | TokenIds | list[TokenIds]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    """Sampling and stopping parameters shared by completions and chat completions."""

    model: StrictStr | None = None
    max_tokens: Annotated[StrictInt, Field(le=2**31)] | None = 16
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] = 1.0
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[StrictInt, Field(ge=-1, le=2**31)] = 0
    min_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] = 0.0
    repetition_penalty: Annotated[StrictFloat, Field(gt=0.0, le=100.0)] = 1.0
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] = 0.0
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] = 0.0
    logit_bias: dict[StrictStr, Annotated[StrictFloat, Field(ge=-100.0, le=100.0)]] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: Annotated[StrictInt, Field(ge=0, le=2**63 - 1 - 256)] | None = None
    n: Annotated[StrictInt, Field(ge=1, le=2**31)] = 1
    ignore_eos: StrictBool = False
    min_tokens: Annotated[StrictInt, Field(ge=0, le=2**31)] = 0
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: StrictStr | None = None


class CompletionRequest(_Sampling):
    prompt: Prompt
    echo: StrictBool = False
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant"]
    content: StrictStr


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(le=2**31)] | None = None


class ScoreRequest(_Body):
    """One of: `text` (a string or a list), `context` + `continuations`, or `text` with `rolling`."""

    model: StrictStr | None = None
    text: StrictStr | list[StrictStr] | None = None
    context: StrictStr | None = None
    continuations: list[StrictStr] | None = None
    rolling: StrictBool = False
    stride: Annotated[StrictInt, Field(ge=1)] | None = None
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] = 0
    add_bos: StrictBool = True


class TokenizeRequest(_Body):
    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool = True


class DetokenizeRequest(_Body):
    model: StrictStr | None = None
    tokens: TokenIds


class ReloadRequest(_Body):
    model: StrictStr


class AdapterRequest(_Body):
    adapter: StrictStr

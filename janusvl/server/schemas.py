"""Request bodies of the OpenAI-compatible API, as pydantic models (they also make the
OpenAPI document at /openapi.json). Fields follow OpenAI's names; `top_k`, `seed` on images,
`cfg_weight` and image `temperature` are janusvl's extensions."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_SEED = 2**63 - 1


def _unicode(value: str) -> str:
    # JSON can carry a lone surrogate ("\\ud800"), which no UTF-8 text (nor the tokenizer) can take.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"holds a lone surrogate at character {exc.start}, which is not valid Unicode "
                         "text") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]


class _Body(BaseModel):
    # OpenAI clients send fields this server has no use for (user, metadata, ...): ignore them.
    # Strict: 1.0 is not an integer, 0 is not a boolean, "5" is not a number.
    model_config = ConfigDict(extra="ignore", strict=True)


class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ImageURL(_Body):
    url: str = Field(description="a data:image/...;base64, URL (http(s) only with --allow-remote-images)")
    detail: str | None = None


class ImagePart(_Body):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None
    name: Text | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class ChatCompletionRequest(_Body):
    model: Text | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2, description="0 is greedy")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="sample among the k likeliest tokens; 0 = all (extension)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Text | list[Text] | None = Field(None, description="up to 16 strings")
    n: int = Field(1, ge=1, le=8)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Accepted at their neutral values only: anything else is refused, not silently ignored.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool = False


class ImageGenerationRequest(_Body):
    prompt: Text = Field(min_length=1)
    model: Text | None = None
    n: int = Field(1, ge=1, le=16)
    size: Literal["384x384"] = Field("384x384", description="only 384x384, the released models' size")
    response_format: Literal["b64_json"] = Field("b64_json", description="only b64_json (PNG)")
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    cfg_weight: float = Field(5.0, gt=0, le=100, description="classifier-free guidance scale (extension)")
    temperature: float = Field(1.0, gt=0, le=10, description="divides the guided logits (extension)")
    stream: bool = False


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error, in OpenAI's shape."""
    error: ErrorDetail


def error_responses(*codes: int) -> dict[int | str, dict]:
    """OpenAPI entries for the error statuses a route may answer."""
    return {code: {"model": ErrorResponse} for code in codes}

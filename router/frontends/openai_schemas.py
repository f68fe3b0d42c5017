"""OpenAI request bodies, validated, and their translation into the router's internal request.

The parameters are OpenAI's (``/v1/completions``, ``/v1/chat/completions``) plus vLLM's extras
(``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``min_tokens``, ``stop_token_ids``,
``include_stop_str_in_output``, ``add_generation_prompt``, ``priority``, ``prompt_logprobs``,
``structured_outputs`` and the older ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar``), with
OpenAI's documented ranges; ``response_format`` (``text``, ``json_object``, ``json_schema``) on
both endpoints, and llmserve's ``logits_processors`` / ``stopping_criteria`` (docs/PLUGINS.md).
Unknown fields are ignored, as OpenAI-compatible servers do. A value out of range, of the wrong
type, or a feature this server does not have (tools, image parts, ``suffix``) is an
:class:`~router.frontends.openai_errors.InvalidParam` naming the parameter. A completions
``prompt`` may be a list of prompts (a batch): one router request each.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llmserve.limits import flag_of
from llmserve.multimodal import decode_data_url
from llmserve.prompt_input import CONTINUE_NEEDS_NO_GENERATION_PROMPT, ChatPrompt, PromptInput
from llmserve.sampling_extras import (
    GUIDED_FIELDS,
    MAX_BEAM_WIDTH,
    plugin_call_messages,
    structured_output_message,
)
from llmserve.v1 import generation_pb2 as gen_pb
from router.errors import LimitRefused
from router.frontends.openai_errors import InvalidParam, validation_param
from router.frontends.tool_calls import ToolChoice, function_tools
from router.generation import RouterRequest

MAX_N = 128
MAX_LOGPROBS = 20
BATCH_LIMIT = "max_batch_prompts"  # prompts of one /v1/completions request (a router flag)
# What the worker's message fields hold (llmserve.v1.SamplingParams, TokenIds): uint32 counts,
# int32 token ids and top_k. Larger values are refused here, naming the parameter.
UINT32_END = 2**32
INT32_END = 2**31


class StreamOptions(BaseModel):
    """``stream_options``: ``include_usage`` adds a last chunk with the usage and no choices;
    vLLM's ``continuous_usage_stats`` (with it) puts each choice's usage so far in every chunk."""

    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingRequest(BaseModel):
    """What completions and chat share: model, sampling, streaming."""

    model_config = ConfigDict(extra="ignore")

    model: str = ""
    n: int = Field(1, ge=1, le=MAX_N)
    max_tokens: int | None = Field(None, ge=1, lt=UINT32_END)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**64)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[int, float] | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: int | None = Field(None, ge=-1, lt=INT32_END)
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    repetition_penalty: float | None = Field(None, gt=0.0, le=2.0)
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0, lt=UINT32_END)
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    priority: int | None = Field(None, ge=-(2**31), lt=2**31)
    truncate_prompt_tokens: int | None = Field(None, ge=-1, lt=INT32_END)
    prompt_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    logits_processors: list[Any] | None = None
    stopping_criteria: list[Any] | None = None
    # vLLM's beam search: the n best of n beams (n is the beam width)
    use_beam_search: bool = False
    length_penalty: float = Field(1.0, ge=-10.0, le=10.0)

    def to_router_requests(self, request_id: str, max_prompts: int,
                           tool_parser: str | None = None) -> list[RouterRequest]:
        """The router requests this body asks for (several: a completions batch);
        ``tool_parser``: the model's tool-call parser (chat's ``tool_choice`` "auto")."""
        raise NotImplementedError

    def to_router_request(self, request_id: str, tool_parser: str | None = None) -> RouterRequest:
        """The one router request of a body that is not a batch (``LimitRefused`` for a batch)."""
        (one,) = self.to_router_requests(request_id, max_prompts=1, tool_parser=tool_parser)
        return one

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        """Usage in every streamed chunk (vLLM's ``continuous_usage_stats``, with ``include_usage``)."""
        return self.include_usage and self.stream_options is not None \
            and self.stream_options.continuous_usage_stats

    def sampling(self, max_tokens: int | None, logprobs: int | None,
                 prompt_logprobs: int | None = None, tool_format: dict[str, Any] | None = None
                 ) -> gen_pb.SamplingParams:
        """The request's sampling as the worker takes it (unset fields keep vLLM's defaults);
        ``prompt_logprobs``: the alternatives the worker computes per prompt position (the
        request's own ``prompt_logprobs`` when not given); ``tool_format``: the structured
        output a tool choice asks for."""
        if prompt_logprobs is None:
            prompt_logprobs = self.prompt_logprobs
        s = gen_pb.SamplingParams(n=self.n, ignore_eos=self.ignore_eos, min_tokens=self.min_tokens,
                                  include_stop_str_in_output=self.include_stop_str_in_output)
        optional = {
            "max_tokens": max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "seed": self.seed, "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty, "top_k": self.top_k, "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty, "logprobs": logprobs,
            "truncate_prompt_tokens": self.truncate_prompt_tokens, "prompt_logprobs": prompt_logprobs,
        }
        for name, value in optional.items():
            if value is not None:
                setattr(s, name, value)
        s.stop.extend([self.stop] if isinstance(self.stop, str) else self.stop or [])
        s.stop_token_ids.extend(self.stop_token_ids or [])
        s.allowed_token_ids.extend(self.allowed_token_ids or [])
        s.bad_words.extend(self.bad_words or [])
        for token_id, bias in (self.logit_bias or {}).items():
            s.logit_bias[token_id] = bias
        self._add_extras(s, tool_format)
        if self.use_beam_search:  # a stream gets each beam whole when the search ends
            if self.n > MAX_BEAM_WIDTH:
                raise InvalidParam("n", f"n (the beam width with use_beam_search) must be at most "
                                   f"{MAX_BEAM_WIDTH}")
            s.beam_search.CopyFrom(gen_pb.BeamSearch(beam_width=self.n, length_penalty=self.length_penalty))
        return s

    def _add_extras(self, s: gen_pb.SamplingParams, tool_format: dict[str, Any] | None = None) -> None:
        """Structured output (one way of asking for it: ``tool_format`` is a tool choice's) and
        plug-in calls."""
        formats = [(param, spec) for param, spec in (
            ("tool_choice", tool_format),
            ("response_format", self._response_format()),
            ("structured_outputs", self.structured_outputs),
            *((name, {kind: getattr(self, name)}) for name, kind in GUIDED_FIELDS.items()
              if getattr(self, name) is not None),
        ) if spec is not None]
        if len(formats) > 1:
            raise InvalidParam(formats[1][0], f"{formats[0][0]} and {formats[1][0]} exclude each other")
        for param, spec in formats:
            try:
                s.structured_output.CopyFrom(structured_output_message(spec))
            except ValueError as exc:
                raise InvalidParam(param, f"{param}: {exc}") from None
        for field in ("logits_processors", "stopping_criteria"):
            try:
                getattr(s, field).extend(plugin_call_messages(field, getattr(self, field)))
            except ValueError as exc:
                raise InvalidParam(field, str(exc)) from None

    def _response_format(self) -> dict[str, Any] | None:
        """OpenAI's ``response_format`` as a structured-output spec (None: free text)."""
        rf = self.response_format
        kind = rf.get("type") if rf is not None else "text"
        if kind == "text":
            return None
        if kind == "json_object":
            return {"json_object": True}
        if kind == "json_schema" and isinstance(rf, dict):
            spec = rf.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise InvalidParam("response_format", "response_format.json_schema.schema must be an object")
            return {"json": schema}
        raise InvalidParam("response_format", "response_format.type must be text, json_object or json_schema")

    def check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise InvalidParam("stream_options", "stream_options is only allowed with stream=true")
        if self.prompt_logprobs is not None and self.stream:  # vLLM refuses the pair too
            raise InvalidParam("prompt_logprobs", "prompt_logprobs is not available with stream=true")
        for token_id, bias in (self.logit_bias or {}).items():
            if not -100.0 <= bias <= 100.0:
                raise InvalidParam("logit_bias", f"logit_bias[{token_id}] must be in [-100, 100], got {bias}")
            if not 0 <= token_id < INT32_END:
                raise InvalidParam("logit_bias",
                                   f"logit_bias keys must be token ids in [0, 2^31), got {token_id}")
        if isinstance(self.stop, list) and any(not s for s in self.stop) or self.stop == "":
            raise InvalidParam("stop", "stop must not contain empty strings")
        for name in ("stop_token_ids", "allowed_token_ids"):
            if any(not 0 <= t < INT32_END for t in getattr(self, name) or []):
                raise InvalidParam(name, f"{name} must be token ids in [0, 2^31)")
        if self.allowed_token_ids is not None and not self.allowed_token_ids:
            raise InvalidParam("allowed_token_ids", "allowed_token_ids must not be empty")
        if self.bad_words is not None and not all(w.strip() for w in self.bad_words):
            raise InvalidParam("bad_words", "bad_words must be non-blank strings")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidParam("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens "
                               f"({self.max_tokens})")


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``.

    ``echo`` with ``logprobs`` N asks the worker for the prompt's logprobs too (N alternatives, or
    ``prompt_logprobs`` when larger), shown before the generated ones; ``echo`` with
    ``max_tokens`` 0 (vLLM's) returns the prompt alone: the worker generates one token, not shown.
    """

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(None, ge=0, lt=UINT32_END)  # 0: with echo only
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    suffix: str | None = None
    best_of: int | None = None

    def prompt_inputs(self, max_prompts: int) -> list[PromptInput]:
        """The prompts (:func:`prompt_batch` of ``prompt``)."""
        return prompt_batch(self.prompt, max_prompts, "prompt")

    def to_router_requests(self, request_id: str, max_prompts: int,
                           tool_parser: str | None = None) -> list[RouterRequest]:
        """One router request per prompt; a batch's ids are ``{request_id}-{i}`` (vLLM's)."""
        self.check_common()
        if self.suffix:
            raise InvalidParam("suffix", "suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidParam("best_of", "best_of is not supported (only best_of == n)")
        if self.max_tokens == 0 and not self.echo:
            raise InvalidParam("max_tokens", "max_tokens must be at least 1 (0 only with echo: the prompt "
                               "alone)")
        prompts = self.prompt_inputs(max_prompts)
        if self.echo_only:  # the worker generates one token, which the response leaves out
            sampling = self.sampling(1, None, self.prompt_logprobs_to_compute())
        else:
            sampling = self.sampling(self.max_tokens, self.logprobs, self.prompt_logprobs_to_compute())
        return [RouterRequest(model=self.model, prompt=prompt, sampling=sampling,
                              request_id=request_id if len(prompts) == 1 else f"{request_id}-{i}",
                              priority=self.priority, request_id_unique=True)
                for i, prompt in enumerate(prompts)]

    @property
    def echo_only(self) -> bool:
        """vLLM's echo without generation: ``echo`` with ``max_tokens`` 0."""
        return self.echo and self.max_tokens == 0

    @property
    def echo_logprobs(self) -> int | None:
        """Alternatives per prompt position shown in the choices' logprobs (``echo`` with
        ``logprobs``), None when the prompt's tokens are not shown there."""
        return self.logprobs if self.echo else None

    def prompt_logprobs_to_compute(self) -> int | None:
        """Alternatives per prompt position the worker computes: enough for ``prompt_logprobs``
        and for the echoed prompt's logprobs (each shows its own number)."""
        asked = [n for n in (self.prompt_logprobs, self.echo_logprobs) if n is not None]
        return max(asked) if asked else None


def prompt_batch(prompt: Any, max_prompts: int, param: str) -> list[PromptInput]:
    """``param``'s prompts: one text or token-id list, or a list of them (a batch: each a request
    of its own, as vLLM serves it). More than ``max_prompts`` is refused (``LimitRefused``)."""
    batch = isinstance(prompt, list) and prompt and isinstance(prompt[0], str | list)
    prompts: list[Any] = list(prompt) if batch else [prompt]
    if len(prompts) > max_prompts:
        raise LimitRefused(BATCH_LIMIT, (
            f"{param} is too large: {len(prompts)} prompts; the limit is {max_prompts} "
            f"({BATCH_LIMIT}, flag {flag_of(BATCH_LIMIT)})"))
    for i, one in enumerate(prompts):
        name = f"{param}[{i}]" if batch else param
        if not one:
            raise InvalidParam(param, f"{name} must not be empty")
        if isinstance(one, list) and any(not 0 <= t < INT32_END for t in one):
            raise InvalidParam(param, f"{name}: token ids must be in [0, 2^31)")
    return prompts


class EmbeddingRequest(BaseModel):
    """``POST /v1/embeddings`` (a model served by workers with ``--runner pooling``): one router
    request per input, as a completions batch. ``encoding_format`` "base64" is the float32 vector's
    little-endian bytes (what the ``openai`` SDK asks for by default); ``dimensions`` is refused
    (no model here is trained to be cut)."""

    model_config = ConfigDict(extra="ignore")
    model: str = ""
    input: str | list[int] | list[str] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    truncate_prompt_tokens: int | None = Field(None, ge=-1, lt=INT32_END)
    priority: int | None = Field(None, ge=-(2**31), lt=2**31)

    def to_router_requests(self, request_id: str, max_prompts: int) -> list[RouterRequest]:
        if self.dimensions is not None:
            raise InvalidParam("dimensions", "dimensions is not supported (the model's size is served whole)")
        prompts = prompt_batch(self.input, max_prompts, "input")
        sampling = gen_pb.SamplingParams()
        if self.truncate_prompt_tokens is not None:
            sampling.truncate_prompt_tokens = self.truncate_prompt_tokens
        return [RouterRequest(model=self.model, prompt=prompt, sampling=sampling,
                              request_id=request_id if len(prompts) == 1 else f"{request_id}-{i}",
                              priority=self.priority, request_id_unique=True, embed=True)
                for i, prompt in enumerate(prompts)]


class TextPart(BaseModel):
    """A text part of a message's content; part types other than text and images (audio, video,
    files) are refused."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    model_config = ConfigDict(extra="ignore")
    url: str
    detail: str | None = None  # OpenAI's; the model's processor decides the resolution


class ImageUrlPart(BaseModel):
    """An image part (``{"type": "image_url", "image_url": {"url": "data:image/png;base64,..."}}``;
    vLLM also takes the URL as a string). Only ``data:`` URLs are served: the router fetches
    nothing."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["image_url"]
    image_url: ImageUrl | str

    @property
    def url(self) -> str:
        return self.image_url if isinstance(self.image_url, str) else self.image_url.url


ContentPart = Annotated[TextPart | ImageUrlPart, Field(discriminator="type")]


class ToolCallIn(BaseModel):
    """A call in an earlier assistant message (``messages[i].tool_calls``)."""

    model_config = ConfigDict(extra="ignore")
    id: str = ""
    type: Literal["function"] = "function"
    function: dict[str, Any]


class ChatMessageIn(BaseModel):
    """One message: role and content (a string, or text parts joined by newlines); an assistant's
    earlier ``tool_calls`` and a tool result's ``tool_call_id`` go to the chat template."""

    model_config = ConfigDict(extra="ignore")
    role: str = Field(min_length=1)
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "\n".join(part.text for part in self.content if isinstance(part, TextPart))
        return self.content or ""

    @property
    def num_images(self) -> int:
        return sum(isinstance(p, ImageUrlPart) for p in self.content) if isinstance(self.content, list) else 0

    @property
    def has_images(self) -> bool:
        return self.num_images > 0

    def images(self, index: int) -> list[bytes]:
        """The message's images, decoded from their data URLs in order; InvalidParam naming the
        part for any other URL or a payload that is not base64."""
        out = []
        for j, part in enumerate(self.content if isinstance(self.content, list) else ()):
            if isinstance(part, ImageUrlPart):
                field = f"messages[{index}].content[{j}].image_url"
                try:
                    out.append(decode_data_url(part.url, field))
                except ValueError as exc:
                    raise InvalidParam(field, str(exc)) from None
        return out

    def template_message(self, index: int) -> dict[str, Any]:
        """The message as chat templates take it: a call's ``arguments`` as an object (vLLM's
        conversion; templates render them as JSON), ``content`` "" rather than null, and the
        content parts in order (``{"type": "image"}`` for each image, as multimodal templates
        take them) when the message has images."""
        content: Any = self.text()
        if self.has_images and isinstance(self.content, list):
            content = [{"type": "text", "text": p.text} if isinstance(p, TextPart) else {"type": "image"}
                       for p in self.content]
        message: dict[str, Any] = {"role": self.role, "content": content}
        if self.tool_calls:
            calls = []
            for j, call in enumerate(self.tool_calls):
                arguments = call.function.get("arguments", "{}")
                try:
                    parsed = json.loads(arguments) if isinstance(arguments, str) else arguments
                except ValueError:
                    parsed = None
                if not isinstance(parsed, dict) or not isinstance(call.function.get("name"), str):
                    raise InvalidParam("messages", f"messages[{index}].tool_calls[{j}] must name a function "
                                       "and hold its arguments as a JSON object")
                calls.append({"id": call.id, "type": "function",
                              "function": {"name": call.function["name"], "arguments": parsed}})
            message["tool_calls"] = calls
        if self.tool_call_id is not None:
            message["tool_call_id"] = self.tool_call_id
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``. ``tools`` and ``tool_choice`` as vLLM serves them
    (router/frontends/tool_calls.py): ``tool_choice`` defaults to "auto" with tools, which needs
    the model's tool-call parser (``--tool-call-parser``)."""

    messages: list[ChatMessageIn] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, lt=UINT32_END)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    include_reasoning: bool = True

    def tool_choice_spec(self, parser: str | None) -> ToolChoice:
        """The request's use of its tools; ``parser``: the model's tool-call parser (None: none,
        then "auto" is refused, as vLLM refuses it without one)."""
        try:
            tools = function_tools(self.tools or [])
        except ValueError as exc:
            raise InvalidParam("tools", str(exc)) from None
        choice = self.tool_choice if self.tool_choice is not None else ("auto" if tools else "none")
        if choice == "none":
            return ToolChoice("none", tools)
        if not tools:
            raise InvalidParam("tool_choice", "tool_choice needs tools")
        if choice == "auto":
            if parser is None:
                raise InvalidParam("tool_choice", "tool_choice \"auto\" needs the model's tool-call parser "
                                   f"(flag {flag_of('tool_call_parser')}); name a function or use "
                                   "\"required\"")
            return ToolChoice("auto", tools, parallel=self.parallel_tool_calls, parser=parser)
        if choice == "required":
            return ToolChoice("required", tools, parallel=self.parallel_tool_calls)
        function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" \
            else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise InvalidParam("tool_choice", "tool_choice must be \"none\", \"auto\", \"required\" or "
                               "{\"type\": \"function\", \"function\": {\"name\": ...}}")
        if name not in {t.name for t in tools}:
            raise InvalidParam("tool_choice", f"tool_choice names {name!r}, which is not among the tools")
        return ToolChoice("named", tools, name=name)

    def to_router_requests(self, request_id: str, max_prompts: int,
                           tool_parser: str | None = None) -> list[RouterRequest]:
        """The one router request of a chat (``max_prompts`` is the completions' batch limit)."""
        self.check_common()
        tool_choice = self.tool_choice_spec(tool_parser)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidParam("top_logprobs", "top_logprobs needs logprobs=true")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        prompt = chat_prompt(self.messages, self.add_generation_prompt, self.continue_final_message,
                             tools=self.tools or None, template_kwargs=self.chat_template_kwargs)
        return [RouterRequest(
            model=self.model, prompt=prompt,
            sampling=self.sampling(max_tokens, logprobs, tool_format=tool_choice.structured_output()),
            request_id=request_id, max_tokens_to_context=max_tokens is None, priority=self.priority,
            request_id_unique=True, images=chat_images(self.messages),
        )]


def chat_prompt(messages: list[ChatMessageIn], add_generation_prompt: bool,
                continue_final_message: bool, tools: list[Any] | None = None,
                template_kwargs: dict[str, Any] | None = None) -> ChatPrompt:
    """The conversation to render; ``continue_final_message`` with ``add_generation_prompt`` is
    refused naming the first (vLLM refuses the pair too). ``tools`` and ``template_kwargs``
    (``chat_template_kwargs``: the router's tokenizer refuses names it owns) go to the template."""
    if continue_final_message and add_generation_prompt:
        raise InvalidParam("continue_final_message", CONTINUE_NEEDS_NO_GENERATION_PROMPT)
    return ChatPrompt(tuple(m.template_message(i) for i, m in enumerate(messages)), add_generation_prompt,
                      continue_final_message, tools=tuple(tools) if tools else None,
                      template_kwargs=template_kwargs or None)


def chat_images(messages: list[ChatMessageIn]) -> tuple[bytes, ...]:
    """Every image of a conversation, in order of appearance (the template's image tokens' order)."""
    return tuple(image for i, m in enumerate(messages) if m.has_images for image in m.images(i))


RequestT = TypeVar("RequestT", bound=BaseModel)


def model_hint(data: Any) -> str:
    """The ``model`` a body names, before it is validated ("" when it names none): what a refusal
    of the body is counted under."""
    hint = data.get("model") if isinstance(data, dict) else None
    return hint if isinstance(hint, str) else ""


def json_body(body: bytes) -> Any:
    """The parsed body, or None when it is not JSON (the validation reports it), nested too deep
    for the parser included."""
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None


def validate(model: type[RequestT], data: dict[str, Any]) -> RequestT:
    """The validated request; :class:`InvalidParam` naming the first bad field otherwise."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        param = validation_param(tuple(error.get("loc", ())))
        if not param:
            raise InvalidParam("body", f"invalid request body: {error.get('msg')}") from None
        raise InvalidParam(param, f"{param}: {error.get('msg')}") from None

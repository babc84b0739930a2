"""POST /v1/chat/completions (vLLM's `OpenAIServingChat`): messages rendered with the chat
template (conf/serve.yaml `chat.*`, whose stops join the request's), the rest of the context as
the default length, chat logprobs (token, logprob, bytes, top_logprobs), one response or a stream
that opens each choice with the assistant role and may end with usage; the `return_routing` extension."""

from __future__ import annotations

from collections.abc import AsyncIterator

from moe.generate import SamplingParams, TokenLogprob
from serve.openai.base import OpenAIServingGeneration, Prepared, Prompts
from serve.openai.protocol import ChatCompletionRequest
from serve.openai.responses import (
    AssistantMessage,
    ChatCompletionLogProb,
    ChatCompletionLogProbs,
    ChatCompletionLogProbsContent,
    ChatCompletionResponse,
    ChatCompletionResponseChoice,
    ChatCompletionResponseStreamChoice,
    ChatCompletionStreamResponse,
    DeltaMessage,
    UsageInfo,
)


class OpenAIServingChat(
        OpenAIServingGeneration[ChatCompletionRequest, ChatCompletionResponse, ChatCompletionStreamResponse]):
    request_id_prefix = "chatcmpl-"
    prompt_param = "messages"

    def render_prompts(self, req: ChatCompletionRequest) -> Prompts:
        text = self.render_chat(req.messages, req.add_generation_prompt)
        return Prompts([self.tokenizer.encode(text)], [text], filter_texts=[m.text() for m in req.messages])

    def default_max_tokens(self) -> int:
        return self.models.max_model_len

    def sampling_params(self, req: ChatCompletionRequest, max_tokens: int, choice: int) -> SamplingParams:
        return req.to_sampling_params(max_tokens, seed_offset=choice, extra_stop=self.ctx.chat_template.stop)

    def response(self, req: ChatCompletionRequest, prep: Prepared) -> ChatCompletionResponse:
        choices = [
            ChatCompletionResponseChoice(
                index=i, message=AssistantMessage(content=s.text),
                logprobs=self._logprobs(s.logprobs) if s.params.logprobs is not None else None,
                finish_reason=s.finish_reason,
                routing=self.routing(s.output_ids, s.routing) if req.return_routing else None)
            for i, s in enumerate(prep.seqs)]
        return ChatCompletionResponse(id=prep.request_id, created=prep.created, model=self.model_name,
                                      choices=choices, usage=self.usage(prep))

    async def stream(self, req: ChatCompletionRequest, prep: Prepared
                     ) -> AsyncIterator[ChatCompletionStreamResponse]:
        """A role chunk per choice first, then a chunk per engine event that adds text or a finish
        reason (every event, when logprobs are asked for)."""
        def chunk(choice: ChatCompletionResponseStreamChoice | None, usage: UsageInfo | None = None
                  ) -> ChatCompletionStreamResponse:
            return ChatCompletionStreamResponse(id=prep.request_id, created=prep.created, model=self.model_name,
                                                choices=[choice] if choice else [], usage=usage)

        for i in range(len(prep.seqs)):
            yield chunk(ChatCompletionResponseStreamChoice(
                index=i, delta=DeltaMessage(role="assistant", content=""), logprobs=None, finish_reason=None))
        async for ev in self.events(prep):
            wants_logprobs = prep.seqs[ev.index].params.logprobs is not None
            routing = self.routing(ev.token_ids, ev.routing) if req.return_routing else None
            if not ev.text and ev.finish_reason is None and not wants_logprobs and not (routing and routing.tokens):
                continue
            yield chunk(ChatCompletionResponseStreamChoice(
                index=ev.index, delta=DeltaMessage(content=ev.text or None),
                logprobs=self._logprobs(ev.logprobs) if wants_logprobs else None, finish_reason=ev.finish_reason,
                routing=routing))
        self.log_done(prep)
        if req.include_usage():
            yield chunk(None, usage=self.usage(prep))

    def _logprobs(self, gen: list[TokenLogprob]) -> ChatCompletionLogProbs:
        token_str = self.tokenizer.token_str

        def entry(token_id: int, logprob: float) -> ChatCompletionLogProb:
            s = token_str(token_id)
            return ChatCompletionLogProb(token=s, logprob=logprob, bytes=list(s.encode()))

        content = []
        for lp in gen:
            s = token_str(lp.token_id)
            content.append(ChatCompletionLogProbsContent(token=s, logprob=lp.logprob, bytes=list(s.encode()),
                                                         top_logprobs=[entry(t, v) for t, v in lp.top]))
        return ChatCompletionLogProbs(content=content)

"""vLLM's POST /tokenize (a prompt, or chat messages through the chat template) and POST /detokenize
(token ids, checked against the vocabulary) with the replica's tokenizer."""

from __future__ import annotations

from serve.openai.base import OpenAIServing
from serve.openai.protocol import DetokenizeRequest, TokenizeRequest
from serve.openai.responses import DetokenizeResponse, TokenizeResponse


class OpenAIServingTokenization(OpenAIServing):
    async def create_tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.check_model(req.model)
        if req.messages is not None:
            text = self.render_chat(req.messages, req.add_generation_prompt)
        else:
            assert req.prompt is not None
            text = req.prompt
        ids = self.tokenizer.encode(text, add_special_tokens=req.add_special_tokens)
        strs = [self.tokenizer.token_str(t) for t in ids] if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.models.max_model_len, tokens=ids, token_strs=strs)

    async def create_detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(req.model)
        self.tokenizer.check_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))

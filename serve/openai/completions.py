"""POST /v1/completions (vLLM's `OpenAIServingCompletion`): prompts as a string, strings, token
ids or lists of token ids; `n` choices per prompt (with `best_of`, the n of best_of candidates
with the highest sum of token logprobs); `echo` (the prompt text, and with `logprobs` the prompt
tokens scored); the `return_routing` extension; legacy logprobs (tokens, token_logprobs, top_logprobs, text_offset); one response
or a stream of chunks (the last with usage when asked)."""

from __future__ import annotations

from collections.abc import AsyncIterator

from moe.generate import SamplingParams, Sequence, TokenLogprob
from serve.openai.base import OpenAIServingGeneration, Prepared, Prompts
from serve.openai.protocol import CompletionRequest
from serve.openai.responses import (
    CompletionLogProbs,
    CompletionResponse,
    CompletionResponseChoice,
    CompletionResponseStreamChoice,
    CompletionStreamResponse,
    UsageInfo,
)


class OpenAIServingCompletion(
        OpenAIServingGeneration[CompletionRequest, CompletionResponse, CompletionStreamResponse]):
    request_id_prefix = "cmpl-"
    prompt_param = "prompt"

    def render_prompts(self, req: CompletionRequest) -> Prompts:
        p, tok = req.prompt, self.tokenizer
        if isinstance(p, str):
            texts, ids = [p], [tok.encode(p)]
        elif isinstance(p[0], str):
            texts, ids = list(p), [tok.encode(s) for s in p]  # type: ignore[arg-type]
        else:  # token ids: checked against the vocabulary before the tokenizer decodes them
            ids = [list(p)] if isinstance(p[0], int) else [list(x) for x in p]  # type: ignore[union-attr,list-item]
            for i, x in enumerate(ids):
                tok.check_ids(x, "prompt" if isinstance(p[0], int) else f"prompt.{i}")
            texts = [tok.decode(x) for x in ids]
        return Prompts(ids, texts, filter_texts=texts)

    def default_max_tokens(self) -> int:
        return self.ctx.engine_cfg.default_max_tokens

    def sampling_params(self, req: CompletionRequest, max_tokens: int, choice: int) -> SamplingParams:
        return req.to_sampling_params(max_tokens, seed_offset=choice)

    def best(self, req: CompletionRequest, prep: Prepared) -> list[tuple[int, Sequence]]:
        """(prompt index, sequence) of the choices: with best_of > n, the n candidates of each prompt with
        the highest sum of token logprobs (best first), else every sequence in order."""
        pairs = [(i // prep.n, s) for i, s in enumerate(prep.seqs)]
        if prep.n == req.n:
            return pairs
        out = []
        for p in range(len(prep.prompts)):
            group = [s for _, s in pairs[p * prep.n:(p + 1) * prep.n]]
            group.sort(key=lambda s: -sum(lp.logprob for lp in s.logprobs))
            out += [(p, s) for s in group[:req.n]]
        return out

    def response(self, req: CompletionRequest, prep: Prepared) -> CompletionResponse:
        choices = []
        for i, (prompt_i, s) in enumerate(self.best(req, prep)):
            prefix = prep.prompt_texts[prompt_i] if req.echo else ""
            lp = None
            if req.logprobs is not None:
                pids = prep.prompts[prompt_i] if req.echo else []
                plps = (s.prompt_logprobs or [None] * len(pids)) if req.echo else []
                lp = self._logprobs(plps, pids, s.logprobs, offset0=0)
            routing = self.routing(s.output_ids, s.routing) if req.return_routing else None
            choices.append(CompletionResponseChoice(index=i, text=prefix + s.text, logprobs=lp,
                                                    finish_reason=s.finish_reason, routing=routing))
        return CompletionResponse(id=prep.request_id, created=prep.created, model=self.model_name,
                                  choices=choices, usage=self.usage(prep))

    async def stream(self, req: CompletionRequest, prep: Prepared) -> AsyncIterator[CompletionStreamResponse]:
        """A chunk per engine event that adds text, logprobs or a finish reason; the first chunk of a
        choice carries its echoed prompt."""
        def chunk(choices: list[CompletionResponseStreamChoice], usage: UsageInfo | None = None
                  ) -> CompletionStreamResponse:
            return CompletionStreamResponse(id=prep.request_id, created=prep.created, model=self.model_name,
                                            choices=choices, usage=usage)

        started = [False] * len(prep.seqs)
        offsets = [0] * len(prep.seqs)
        async for ev in self.events(prep):
            i = ev.index
            text, prompt_lps, prompt_ids = ev.text, [], []
            if not started[i]:
                started[i] = True
                if req.echo:
                    text = prep.prompt_texts[i // prep.n] + text
                    prompt_ids = prep.prompts[i // prep.n]
                    prompt_lps = ev.prompt_logprobs or [None] * len(prompt_ids)
            lp = None
            if prep.seqs[i].params.logprobs is not None:
                lp = self._logprobs(prompt_lps, prompt_ids, ev.logprobs, offsets[i])
                if lp.tokens:
                    offsets[i] = lp.text_offset[-1] + len(lp.tokens[-1])
            routing = self.routing(ev.token_ids, ev.routing) if req.return_routing else None
            if not text and lp is None and ev.finish_reason is None and not (routing and routing.tokens):
                continue
            yield chunk([CompletionResponseStreamChoice(index=i, text=text, logprobs=lp,
                                                        finish_reason=ev.finish_reason, routing=routing)])
        self.log_done(prep)
        if req.include_usage():
            yield chunk([], usage=self.usage(prep))

    # ---- logprobs -----------------------------------------------------------------------------
    def _top_dict(self, lp: TokenLogprob) -> dict[str, float]:
        token_str = self.tokenizer.token_str
        top = {token_str(lp.token_id): lp.logprob}
        for t, v in lp.top:
            top.setdefault(token_str(t), v)
        return top

    def _logprobs(self, prompt_lps: list[TokenLogprob | None], prompt_ids: list[int],
                  gen: list[TokenLogprob], offset0: int) -> CompletionLogProbs:
        """Prompt entries (the first token has none) then generated ones, offsets counted from `offset0`."""
        out = CompletionLogProbs()
        offset = offset0
        entries: list[tuple[int, TokenLogprob | None]] = list(zip(prompt_ids, prompt_lps))
        entries += [(lp.token_id, lp) for lp in gen]
        for tid, lp in entries:
            s = self.tokenizer.token_str(tid)
            out.tokens.append(s)
            out.token_logprobs.append(None if lp is None else lp.logprob)
            out.top_logprobs.append(None if lp is None else self._top_dict(lp))
            out.text_offset.append(offset)
            offset += len(s)
        return out

"""The OpenAI API inside a model replica, one class per endpoint on a shared base (the shape of
vLLM's `entrypoints/openai`):

- protocol.py     request schemas, the sampling parameters a request builds, the error shape
- responses.py    typed responses and stream chunks (their `model_dump()` is the wire JSON)
- base.py         the shared base: tokenizer, model and request checks, running the engine, usage, logs
- completions.py  OpenAIServingCompletion (/v1/completions)
- chat.py         OpenAIServingChat (/v1/chat/completions)
- tokenization.py OpenAIServingTokenization (/tokenize, /detokenize)
- models.py       OpenAIServingModels (/v1/models and the model check)

protocol.py and responses.py are light (pydantic only) so the ingress can import them; the serving
classes import torch and run in the replica.
"""

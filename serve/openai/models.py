"""GET /v1/models and the model check of every endpoint: the one model a replica serves, its name
(the `model` clients send), context length and creation time."""

from __future__ import annotations

import time

from serve.openai.protocol import APIError
from serve.openai.responses import ModelCard, ModelList


class OpenAIServingModels:
    def __init__(self, name: str, max_model_len: int) -> None:
        self.name = name
        self.max_model_len = max_model_len
        self.created = int(time.time())

    def model_card(self) -> ModelCard:
        return ModelCard(id=self.name, created=self.created, root=self.name, max_model_len=self.max_model_len)

    def show_available_models(self) -> ModelList:
        return ModelList(data=[self.model_card()])

    def check_model(self, name: str | None) -> None:
        """A request may leave `model` out; if it names one, it must be this one (else 404)."""
        if name is not None and name != self.name:
            raise APIError(404, f"The model {name!r} does not exist; this server serves {self.name!r} "
                                "(see GET /v1/models).", param="model", code="model_not_found")

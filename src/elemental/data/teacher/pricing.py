"""What labeling costs: the config's price table applied to tokens, before a run (an estimate) and after (the bill).

Prices are per model name; a dated snapshot (`gpt-4o-mini-2024-07-18`, as OpenAI names the model that
answered) is priced as its base name. Expected tokens per photo come from the label cache when it holds
enough measured answers of the model (`MIN_HISTORY`), else from the price table's figures.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ...config import PRICES_AS_OF, ModelPrice, PrepareConfig

MIN_HISTORY = 10  # cached answers of a model before their mean replaces the table's tokens per photo


def default_prices() -> dict[str, ModelPrice]:
    """The config's price table when nothing overrides it (one place turns DEFAULT_PRICES into prices)."""
    return PrepareConfig().prices


def price_for(model: str, prices: Mapping[str, ModelPrice]) -> ModelPrice | None:
    """The price of a model or of a dated snapshot of one; None when the table does not name it."""
    if model in prices:
        return prices[model]
    return prices.get(re.sub(r"-\d{4}-\d{2}-\d{2}$", "", model))


def cost_usd(price: ModelPrice, tokens_in: int, tokens_out: int, *, batch: bool = False) -> float:
    usd = (tokens_in * price.input_per_1m + tokens_out * price.output_per_1m) / 1_000_000
    return usd * price.batch_discount if batch else usd


@dataclass(frozen=True)
class PhotoTokens:
    """Tokens one photo is expected to bill, and where the figure comes from."""

    tokens_in: float
    tokens_out: float
    source: str  # "N cached answers" or "price table"


def _photo_tokens(price: ModelPrice | None, history: Mapping[str, int]) -> PhotoTokens | None:
    """Per-photo tokens: the mean of the cache's answers when there are enough, else the price table's."""
    answers = history["entries"]
    if answers >= MIN_HISTORY:
        return PhotoTokens(history["tokens_in"] / answers, history["tokens_out"] / answers,
                           f"mean of {answers} cached answers")
    if price is None:
        return None
    return PhotoTokens(price.photo_tokens_in, price.photo_tokens_out, f"price table ({PRICES_AS_OF})")


def estimate(n_photos: int, model: str, prices: Mapping[str, ModelPrice], history: Mapping[str, int]) -> dict:
    """What labeling `n_photos` with `model` takes: tokens, and USD at the sync and the batch price (None if
    unknown). `history` is the label cache's `stats` for this model and prompt (its measured answers)."""
    price = price_for(model, prices)
    tokens = _photo_tokens(price, history)
    out: dict[str, object] = {"photos": n_photos, "tokens_per_photo_from": tokens.source if tokens else None,
                              "tokens_in": None, "tokens_out": None, "sync_usd": None, "batch_usd": None,
                              "prices_as_of": PRICES_AS_OF, "model": model,
                              "price_usd_per_1m": ({"input": price.input_per_1m, "output": price.output_per_1m}
                                                   if price else None)}
    if tokens is None:
        return out
    tin, tout = round(n_photos * tokens.tokens_in), round(n_photos * tokens.tokens_out)
    out.update(tokens_in=tin, tokens_out=tout)
    if price is not None:
        out.update(sync_usd=round(cost_usd(price, tin, tout), 6),
                   batch_usd=round(cost_usd(price, tin, tout, batch=True), 6))
    return out

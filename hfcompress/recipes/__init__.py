"""Recipes that chain compression steps, and the search for the best compression under a budget. Names are
imported on first use."""

from .._lazy import lazy_namespace

_EXPORTS = {
    "Recipe": ".recipe",
    "RecipeError": ".recipe",
    "RecipeStep": ".recipe",
    "run_recipe": ".runner",
    "streamed_gptq_scores": ".streamed_sensitivity",
    "validate_recipe": ".runner",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_namespace(__name__, _EXPORTS)

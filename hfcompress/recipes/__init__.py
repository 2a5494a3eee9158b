"""Recipes that chain compression steps, and the search for the best compression under a budget."""

from .recipe import Recipe, RecipeError, RecipeStep
from .runner import run_recipe, validate_recipe

__all__ = ["Recipe", "RecipeError", "RecipeStep", "run_recipe", "validate_recipe"]

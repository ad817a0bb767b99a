"""Training recipes: what is trained (networks, losses, step phases, sample grid, exports).

    from fastcgan.recipes import get_recipe
    recipe = get_recipe(cfg.model.recipe)    # "cyclegan", "pix2pix", "cut", "colorization"

See :mod:`fastcgan.recipes.base` for what a recipe holds; the trainer runs any of them.
"""

from __future__ import annotations

from fastcgan.recipes.base import Phase, Recipe, StepRun
from fastcgan.recipes.colorization import RECIPE as COLORIZATION
from fastcgan.recipes.cut import RECIPE as CUT
from fastcgan.recipes.cyclegan import RECIPE as CYCLEGAN
from fastcgan.recipes.pix2pix import RECIPE as PIX2PIX

RECIPES: dict[str, Recipe] = {r.name: r for r in (CYCLEGAN, PIX2PIX, CUT, COLORIZATION)}
for _r in RECIPES.values():
    _r.check()


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ValueError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}") from None


__all__ = ["RECIPES", "Phase", "Recipe", "StepRun", "get_recipe"]

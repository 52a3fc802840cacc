"""One recipe per algorithm: the single definition of what it does (`selfplay.recipes.base.Recipe`).

A recipe says which weights generators serve (`weights`: the policy, or SAPO's EMA policy), whether the learners
keep an EMA (`ema`), the loss and its parameters (`loss`), whether prompts need reference answers, the generator
call for a batch of prompts (`request`), how its results become judge groups (`groups`, `responses`) and when
the reference model is refreshed, from what (`reference_refresh`). The driver runs all three with one loop.
"""

from selfplay.recipes.base import EMA, Recipe
from selfplay.recipes.sapo import SAPORecipe
from selfplay.recipes.sppo import SPPORecipe
from selfplay.recipes.srpo import SRPORecipe

RECIPES = {"sppo": SPPORecipe, "sapo": SAPORecipe, "srpo": SRPORecipe}


def make_recipe(cfg) -> Recipe:
    return RECIPES[cfg.algorithm](cfg)


__all__ = ["EMA", "RECIPES", "Recipe", "SAPORecipe", "SPPORecipe", "SRPORecipe", "make_recipe"]

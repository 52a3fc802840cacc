"""What each algorithm generates and how its outputs become judge groups (one prompt + its candidates).

Every recipe has the same three parts, so the driver runs all three algorithms with one loop:
  - `weights`: which weights the generators serve (SAPO: the EMA policy; SPPO/SRPO: the policy);
  - `request(generator, prompts)`: the generator call for a batch of prompts (a Ray ObjectRef);
  - `groups(results)`: generator results → judge groups {prompt_id, prompt, candidates, policy_version, …}.
The judge turns groups into replay rows; the learners apply the recipe's loss (`selfplay.objectives`).
Generator output is normalized to text on the way (`selfplay.recipes.base`): an empty or missing response is the
empty string, judged as losing, never a crash (see there).
"""

from selfplay.recipes.sapo import SAPORecipe
from selfplay.recipes.sppo import SPPORecipe
from selfplay.recipes.srpo import SRPORecipe

RECIPES = {"sppo": SPPORecipe, "sapo": SAPORecipe, "srpo": SRPORecipe}


def make_recipe(cfg):
    return RECIPES[cfg.algorithm](cfg)


__all__ = ["RECIPES", "SAPORecipe", "SPPORecipe", "SRPORecipe", "make_recipe"]

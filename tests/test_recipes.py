"""Recipes turn generator results into judge groups: pure functions, checked without Ray."""

import pytest

from selfplay.demo import demo_config, demo_overrides
from selfplay.recipes import SAPORecipe, SPPORecipe, SRPORecipe, make_recipe


def test_sppo_groups_hold_the_k_samples_and_iterations_refresh_the_reference():
    cfg = demo_config("sppo")
    recipe = make_recipe(cfg)
    assert isinstance(recipe, SPPORecipe) and recipe.weights == "policy"
    results = [{"prompt_id": "a", "prompt": "p", "policy_version": 3,
                "samples": [{"text": t} for t in ["1", "2", "3"]]}]
    assert recipe.groups(results) == [{"prompt_id": "a", "prompt": "p", "policy_version": 3,
                                       "candidates": ["1", "2", "3"]}]
    assert recipe.responses(results) == cfg.sppo.k
    refreshes = [s for s in range(cfg.train.steps) if recipe.refresh_reference(s, cfg.train.steps)]
    assert len(refreshes) == cfg.sppo.iterations - 1 and refreshes[0] == cfg.train.steps // cfg.sppo.iterations


def test_sapo_pairs_reference_with_spliced_rejection_and_serves_ema():
    recipe = make_recipe(demo_config("sapo"))
    assert isinstance(recipe, SAPORecipe) and recipe.weights == "ema"
    groups = recipe.groups([{"prompt_id": "a", "prompt": "p", "policy_version": 1, "chosen": "1 2", "rejected": "1 9"}])
    assert groups[0]["candidates"] == ["1 2", "1 9"]
    assert not recipe.refresh_reference(10, 100)


def test_srpo_groups_rank_samples_and_the_revision():
    recipe = make_recipe(demo_config("srpo"))
    assert isinstance(recipe, SRPORecipe)
    groups = recipe.groups([{"prompt_id": "a", "prompt": "p", "policy_version": 2, "samples": ["x", "y"],
                             "chain": ["x", "x revised"]}])
    assert groups[0]["candidates"] == ["x", "y", "x revised"]
    assert groups[0]["candidates_prev"] == [None, None, "x"]


def test_demo_overrides_are_valid_for_every_algorithm_and_mode():
    for algorithm in ("sppo", "sapo", "srpo"):
        for mode in ("sync", "async"):
            for quick in (False, True):
                cfg = demo_config(algorithm, mode, quick)
                assert cfg.algorithm == algorithm and cfg.mode == mode
    with pytest.raises(ValueError, match="unknown algorithm"):
        demo_overrides("ppo")

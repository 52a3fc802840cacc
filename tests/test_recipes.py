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
    refreshes = [s for s in range(cfg.train.steps) if recipe.reference_refresh(s, cfg.train.steps)]
    assert len(refreshes) == cfg.sppo.iterations - 1 and refreshes[0] == cfg.train.steps // cfg.sppo.iterations


def test_sapo_pairs_reference_with_spliced_rejection_and_serves_ema():
    recipe = make_recipe(demo_config("sapo"))
    assert isinstance(recipe, SAPORecipe) and recipe.weights == "ema"
    groups = recipe.groups([{"prompt_id": "a", "prompt": "p", "policy_version": 1, "chosen": "1 2", "rejected": "1 9"}])
    assert groups[0]["candidates"] == ["1 2", "1 9"]
    assert not recipe.reference_refresh(10, 100)  # sapo.reference_update_every = 0: the reference stays
    assert recipe.ema is not None and recipe.needs_reference_answers


def test_recipes_define_weights_ema_loss_and_reference_schedule():
    """Everything that differs between algorithms comes from the recipe, config keys included."""
    sapo = make_recipe(demo_config("sapo", extra=["sapo.reference_update_every=108", "sapo.ema_every=3",
                                                   "sapo.ema_alpha=0.25", "sapo.loss=ipo", "sapo.beta=0.2"]))
    assert (sapo.weights, sapo.ema.every, sapo.ema.alpha) == ("ema", 3, 0.25)
    assert (sapo.loss.name, sapo.loss.beta, sapo.loss.needs_reference) == ("ipo", 0.2, True)
    assert [s for s in range(400) if sapo.reference_refresh(s, 400)] == [108, 216, 324]
    assert {sapo.reference_refresh(s, 400) for s in (108, 216)} == {"ema"}
    sppo = make_recipe(demo_config("sppo", extra=["train.steps=90", "sppo.iterations=3"]))
    assert (sppo.weights, sppo.ema, sppo.loss.name, sppo.needs_reference_answers) == ("policy", None, "sppo", False)
    assert [(s, sppo.reference_refresh(s, 90)) for s in range(90) if sppo.reference_refresh(s, 90)] == \
        [(30, "policy"), (60, "policy")]
    srpo = make_recipe(demo_config("srpo", extra=["train.loss=dpo", "train.loss_average=token_mean"]))
    assert (srpo.ema, srpo.loss.name, srpo.loss.average) == (None, "dpo", "token_mean")  # train.loss overrides
    assert not any(srpo.reference_refresh(s, 100) for s in range(100))


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

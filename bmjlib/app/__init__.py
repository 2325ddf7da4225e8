"""The counterfactual explorer: pick a prior, type a hypothesis, see the counterfactual and what changed."""

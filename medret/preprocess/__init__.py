"""Preprocessing: pure functions from decoded arrays (+ physical spacing) to model inputs.

Recipes compose them and are registered by name in :data:`medret.preprocess.recipes.RECIPES`.
"""

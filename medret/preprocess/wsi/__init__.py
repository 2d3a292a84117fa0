"""Whole-slide preprocessing: tissue masks, tile grids at a target mpp, stain normalisation."""

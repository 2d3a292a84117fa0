"""Sketch/template query: lesion masks in template space as grid codes, ranked exactly by Dice.

:mod:`~medret.sketch.grid` (levels, box, cells of a template), :mod:`~medret.sketch.raster`
(mask -> bits), :mod:`~medret.sketch.regions` (coarse regions of the template brain),
:mod:`~medret.sketch.carry` (a mask through its image's registration), :mod:`~medret.sketch.encoder`
(the lesion encoder registry), :mod:`~medret.sketch.score` (Dice from Hamming distance),
:mod:`~medret.sketch.store` (the ``<table>__lesions`` table), :mod:`~medret.sketch.query`
(a sketch -> top patients) and :mod:`~medret.sketch.ingest` (the indexing job's hook).
"""

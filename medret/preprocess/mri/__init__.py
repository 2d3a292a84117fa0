"""Brain MRI preprocessing, one step per module, composed by :mod:`medret.preprocess.mri.recipe`.

1. :mod:`.orient` reorientation to a canonical orientation code;
2. :mod:`.register` rigid then affine registration to a template (mutual information);
3. :mod:`.skullstrip` the template's brain mask carried back through the inverse transform;
4. :mod:`.bias` N4 bias-field correction on a shrunken image;
5. :mod:`.normalize` intensity normalisation inside the brain;
then :mod:`.slices` resamples into template space and picks fixed axial levels.
"""

"""Evaluation of generated videos without learned models.

:mod:`lvd.eval.shapes` scores moving-shapes clips (colour, shape, direction, consistency) by pixel statistics;
``python -m lvd.eval.shapes --model DIR`` runs it over all 84 captions of the demo.
"""

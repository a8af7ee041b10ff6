"""Directories of the built-in presets, shipped as package data.

`keras_jetformer.models.jetformer_presets` registers them with keras-hub.
"""

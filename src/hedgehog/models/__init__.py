"""Whole models, bottom up: the saved config, on-disk formats, the converted class, conversion, the Auto classes, loading."""

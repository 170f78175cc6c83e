"""Bone age model code: architecture, preprocessing/augmentation, training, evaluation, inference.

The package name is historical (the seed shipped only a male model); one class serves both sexes.
"""

"""Bone age model code: architecture, preprocessing/augmentation, training, evaluation, inference.

The package name is historical (the seed shipped only a male model); one class serves both sexes.
"""

# What every output of these models says of them (API responses, DICOM results).
RESEARCH_NOTICE = "Research model, not a medical device: not for clinical use or diagnosis."

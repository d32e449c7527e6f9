"""Data for training and measuring: the LLaVA format, and the embedded synthetic default."""

from .llava import (IGNORE_INDEX, IMAGE_PLACEHOLDER, PLAIN_SEPARATOR, BadRecord, Collator, Encoder, ImageTransform,
                    LlavaDataset, Segment, StepSampler, check_record, expand_to_square, load_records, open_image)

__all__ = ["IGNORE_INDEX", "IMAGE_PLACEHOLDER", "PLAIN_SEPARATOR", "BadRecord", "Collator", "Encoder",
           "ImageTransform", "LlavaDataset", "Segment", "StepSampler", "check_record", "expand_to_square",
           "load_records", "open_image"]

"""Data for training and measuring: the LLaVA format, and the embedded synthetic default."""

from .llava import (IGNORE_INDEX, IMAGE_PLACEHOLDER, BadRecord, Collator, Encoder, ImageTransform, LlavaDataset,
                    StepSampler, check_record, load_records, open_image)

__all__ = ["IGNORE_INDEX", "IMAGE_PLACEHOLDER", "BadRecord", "Collator", "Encoder", "ImageTransform", "LlavaDataset",
           "StepSampler", "check_record", "load_records", "open_image"]

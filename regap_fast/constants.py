"""Names the data pipeline, the models and the integrations share (no torch, no PIL: cheap to import)."""

IGNORE_INDEX = -100  # label of every token that is not part of an answer (what torch's cross entropy skips)
IMAGE_PLACEHOLDER = "<image>"  # where the image goes in the LLaVA data format
# LLaVA's stage-1 (plain) template ends every caption with this separator (conversation.py conv_llava_plain)
PLAIN_SEPARATOR = "\n"

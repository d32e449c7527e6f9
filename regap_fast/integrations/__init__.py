"""REGAP inside other people's training stacks.

``regap_fast.integrations.transformers``: ``apply_regap(model)`` on a transformers LLaVA / BLIP-2 /
InstructBLIP instance, ``RegapCallback`` for the ``Trainer``'s logs. Imported lazily (transformers
takes seconds to import), also as ``regap_fast.apply_regap``.
"""

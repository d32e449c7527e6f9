"""A minimal LLaVA-style training loop with REGAP (stage 1 and 2), in the spirit of nanoGPT.

    from regap_fast.train import TrainConfig, train
    summary = train(TrainConfig(out="runs/x", max_steps=100))

or ``regap-fast train --help``; ``regap-fast demo`` runs the embedded default with and without REGAP.
"""

from .config import TrainConfig

__all__ = ["TrainConfig", "train"]


def __getattr__(name: str):
    # the loop (torch, transformers) is imported on first use: `regap-fast train --help` does not need it
    if name == "train":
        from .loop import train

        return train
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

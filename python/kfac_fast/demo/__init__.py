"""The demos: the paper's MNIST deep autoencoder (the main job, :mod:`.autoencoder`) and the
architecture demos (:mod:`.tasks`: a ResNet on MNIST, a transformer LM on text), each training
K-FAC and its baselines for the same wall-clock budget. Their models (:mod:`.models`,
:mod:`.models_cnn`, :mod:`.models_lm`) and data (:mod:`.data`) live here too: nothing in the
library imports this subpackage.

    python -m kfac_fast.demo                      # the autoencoder (main job)
    python -m kfac_fast.demo --task cnn           # or --task transformer
"""
from __future__ import annotations

import argparse


def main(argv=None):
    """``python -m kfac_fast.demo [--task autoencoder|cnn|transformer] ...``: dispatch by task."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--task", default="autoencoder")
    task, _ = pre.parse_known_args(argv)
    if task.task == "autoencoder":
        from . import autoencoder

        return autoencoder.main(argv)
    from . import tasks

    return tasks.main(argv)

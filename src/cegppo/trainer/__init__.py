"""The single-machine RLVR trainer: sample, score, advantage, update."""

from cegppo.trainer.trainer import Interrupted, Trainer, load_run_config, new_run_dir

__all__ = ["Interrupted", "Trainer", "load_run_config", "new_run_dir"]

"""`python -m training ARGS` that also saves each process's trained weights as weights.rank<N>.safetensors in the
run folder, for tests that compare every process's model (the export is the main process's alone)."""

from __future__ import annotations

import sys

from safetensors.torch import save_file

import training.train
from training.__main__ import main

_run_loop = training.train.run_loop


def _run_loop_and_save(trainer) -> None:
    _run_loop(trainer)
    weights = {key: value.detach().cpu().contiguous() for key, value in trainer.vae.state_dict().items()}
    save_file(weights, str(trainer.output_dir / f"weights.rank{trainer.accelerator.process_index}.safetensors"))


if __name__ == "__main__":
    training.train.run_loop = _run_loop_and_save
    sys.exit(main(sys.argv[1:]))

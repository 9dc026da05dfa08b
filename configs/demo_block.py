"""Demo, block: the ``demo_flat`` model on the block hyperschedule ω = 16, ALIGNED (seed 000 Fig. 2c).

Efficient block training (``x_noisy ⊕ x_clean`` under the BD3-LM 2L mask, one noise level per
block, seed 001 App. D); at inference the settled blocks sit in the KV cache, and 16 noise levels
per block give 128 network calls for 128 bytes (ρ = 1). ``hybriddiff demo`` starts it from the
trained flat model (``train.init_from``, the paper's stage 2); on its own this file trains from
scratch. 300 steps (twice the slots of a flat step) take about 1.5 minutes on 2 CPU cores.
"""

import pathlib

from hybriddiff.training.config import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("demo_flat.py"))
    config.hyperschedule.update(kind="block", width=16, num_levels=16, alignment="aligned")
    config.train.update(num_steps=300, checkpoint_every=300)
    return config

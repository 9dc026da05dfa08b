"""γ-hybrid on LM1B, block hyperschedule ω = d/4 = 32, SHIFTED (seed 000 Table 2: 26.6 PPL,
the best diffusion result there).

Every cell predicts the next token (seed 000 Fig. 5b) and the score head is told that token's
state; efficient training repeats the last settled token as the first input of each noisy block
(Fig. 10). Stage 2 of the paper fine-tunes a SHIFTED flat model (``lm1b_gamma_flat`` with
``--config.hyperschedule.alignment=shifted``) for 150K steps: set ``train.init_from``.
"""

import pathlib

from hybriddiff.training.config import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("lm1b_gamma_block.py"))
    config.hyperschedule.alignment = "shifted"
    return config

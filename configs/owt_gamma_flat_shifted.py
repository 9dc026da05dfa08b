"""γ-hybrid on OpenWebText, flat hyperschedule, SHIFTED (seed 000 Table 5, 444B tokens).

The SHIFTED configuration (Fig. 5b) is the one that lets a diffusion model start from an
autoregressive checkpoint (§5); every cell predicts the next token and the score head is told
that token's state. The first token of each row is conditioning only, so the bound covers the
other 1023. Otherwise ``owt_gamma_flat``.
"""

import pathlib

from hybriddiff.training.config import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("owt_gamma_flat.py"))
    config.hyperschedule.alignment = "shifted"
    return config

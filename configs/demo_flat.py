"""Demo, flat: a tiny ε-hybrid model on the embedded Python reference text (`hybriddiff demo`).

The demo's network and data (``configs/demo.py``: byte tokenizer, 128-byte rows of
``pydoc_data.topics``, a 4-layer 128-wide DiT in float32) with the ε-hybrid process (ε = 0.01)
and its HDCE loss (seed 000 Eq. 8-9) on the flat hyperschedule, ALIGNED. The ε-hybrid network
needs no noise-level input (seed 000 §3.2); it samples with the MDLM ancestral sampler and ACS
(seed 000 §3.4). λ = 20 weights the unmasked tokens of HDCE up: with λ = 1 the network takes
thousands of steps to learn to copy them, and the ε-hybrid bound pays ``-log p(x0 | z)`` for
every token. 800 steps with a cosine decay and no EMA take about 2 minutes on 2 CPU cores. A
tenth of the 79 topics is held out, so the bound is taken on 8 documents.
"""

import pathlib

from hybriddiff.training.config import load_config_file


def get_config():
    config = load_config_file(pathlib.Path(__file__).with_name("demo.py"))
    config.model.update(time_conditioning=False, weighted_embedding=False)
    config.process.update(name="epsilon", epsilon=0.01, lam=20.0)
    config.loss.kind = "hdce"
    config.hyperschedule.update(kind="flat", num_levels=128, alignment="aligned")
    config.data.validation_fraction = 0.1
    config.train.update(batch_size=16, num_steps=800, learning_rate=2e-3, warmup_steps=50,
                        decay="cosine", ema_decay=0.0, log_every=25, eval_every=100,
                        eval_batches=4, checkpoint_every=800, keep_checkpoints=1, keep_period=0)
    return config

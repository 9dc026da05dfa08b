"""Experiment configs (configs/*.py) and hybriddiff.training.config.validate.

Every config file loads and passes validation; the experiment files carry the papers'
hyperparameters; every rejection path of ``validate`` raises a ValueError naming the key.
"""

from __future__ import annotations

import pathlib

import jax
import ml_collections
import pytest

from hybriddiff.model.sharding import make_mesh
from hybriddiff.processes import EpsilonHybrid, GammaHybrid
from hybriddiff.training import config as config_lib
from hybriddiff.training import core

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"
CONFIG_FILES = sorted(CONFIGS.glob("*.py"))
DEMOS = ["demo", "demo_flat", "demo_block"]
PAPER = ["lm1b_gamma_flat", "lm1b_gamma_block", "lm1b_gamma_block_shifted", "lm1b_epsilon_flat",
         "lm1b_bd3", "lm1b_ar", "owt_gamma_flat", "owt_gamma_flat_shifted", "owt_gamma_block",
         "owt_epsilon_flat", "owt_bd3", "owt_gamma_block_stage2"]
EXPERIMENTS = DEMOS + PAPER


def load(name: str) -> ml_collections.ConfigDict:
    return config_lib.load_config_file(CONFIGS / f"{name}.py")


def test_every_experiment_file_exists():
    assert {path.stem for path in CONFIG_FILES} == {"base", *EXPERIMENTS}


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.stem)
def test_every_config_loads_and_validates(path):
    config = config_lib.load_config_file(path)
    config_lib.validate(config, num_devices=8, num_processes=1)
    config_lib.validate(config, num_devices=1, num_processes=1)


def test_paper_hyperparameters():
    for name in PAPER:
        config = load(name)
        model, train = config.model, config.train
        assert (model.num_layers, model.d_model, model.num_heads) == (12, 768, 12), name
        assert (train.learning_rate, train.ema_decay, train.grad_clip_norm) == (3e-4, 0.9999, 1.0)
        assert (train.batch_size, train.b1, train.b2, train.weight_decay) == (512, 0.9, 0.999, 0.0)
        assert train.warmup_steps == (0 if name.endswith("stage2") else 2_500)
        expected = (128, "lm1b", "bert-base-uncased") if name.startswith("lm1b") else \
            (1024, "openwebtext", "gpt2")
        assert (config.data.seq_len, config.data.source, config.data.tokenizer) == expected, name
    assert load("owt_gamma_flat").process.gamma == 0.01
    for shifted, aligned in (("lm1b_gamma_block_shifted", "lm1b_gamma_block"),
                             ("owt_gamma_flat_shifted", "owt_gamma_flat")):
        config, other = load(shifted), load(aligned)
        assert (config.hyperschedule.alignment, other.hyperschedule.alignment) == ("shifted",
                                                                                  "aligned")
        other.hyperschedule.alignment = "shifted"
        assert config.to_dict() == other.to_dict(), shifted
    assert load("lm1b_gamma_flat").process.gamma == 0.02  # seed 000 Table 2
    for name in ("lm1b_epsilon_flat", "owt_epsilon_flat"):
        assert (load(name).process.epsilon, load(name).loss.kind) == (0.01, "hdce")
    assert (load("lm1b_bd3").hyperschedule.width, load("owt_bd3").hyperschedule.width) == (4, 16)
    assert (load("owt_bd3").schedule.clip_low, load("owt_bd3").schedule.clip_high) == (0.3, 0.8)
    ar = load("lm1b_ar")
    assert (ar.hyperschedule.kind, ar.hyperschedule.alignment, ar.loss.kind) == \
        ("quench", "shifted", "ar")
    stage2, stage1 = load("owt_gamma_block_stage2"), load("owt_gamma_flat")
    assert stage2.train.init_from and stage2.hyperschedule.kind == "block"
    assert stage1.hyperschedule.kind == "flat" and not stage1.train.init_from
    assert (stage2.train.num_steps, stage1.train.num_steps) == (150_000, 850_000)
    assert stage2.process.to_dict() == stage1.process.to_dict()  # same model, new hyperschedule
    assert stage2.model.to_dict() == stage1.model.to_dict()


def test_build_maps_the_config_to_typed_objects():
    mesh = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    demo = core.build(load("demo"), mesh, vocab_size=259)
    assert demo.model_config.output == "score" and demo.model_config.weighted_embedding
    assert demo.objective.process == GammaHybrid(259, 0.05)
    assert demo.model_config.vocab_size == 260
    assert demo.hyperschedule.num_levels == 128 and demo.hyperschedule.length == 128
    bd3 = load("lm1b_bd3")
    bd3.data.seq_len, bd3.model.num_layers = 16, 1
    setup = core.build(bd3, mesh, vocab_size=30)
    assert setup.model_config.output == "log_probs" and not setup.model_config.time_conditioning
    assert (setup.clip_low, setup.clip_high, setup.clip_search) == (0.45, 0.95, True)
    assert setup.objective.layout_kind == "block" and setup.objective.width == 4
    assert all(high - low >= 0.3 - 1e-9 for low, high in setup.clip_grid)
    assert (0.0, 1.0) in setup.clip_grid and (0.45, 0.95) in setup.clip_grid
    epsilon = load("lm1b_epsilon_flat")
    epsilon.data.seq_len, epsilon.model.num_layers = 16, 1
    assert core.build(epsilon, mesh, vocab_size=30).objective.process == EpsilonHybrid(30, 0.01)


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        config_lib.load_config_file(tmp_path / "missing.py")
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        config_lib.load_config_file(empty)
    text = tmp_path / "config.txt"
    text.write_text("def get_config():\n    return None\n")
    with pytest.raises(ValueError, match="cannot be imported"):
        config_lib.load_config_file(text)


def test_resolve_mesh_shape():
    assert config_lib.resolve_mesh_shape((-1, 1, 1), 8) == (8, 1, 1)
    assert config_lib.resolve_mesh_shape((2, -1, 2), 8) == (2, 2, 2)
    assert config_lib.resolve_mesh_shape((1, 4, 2), 8) == (1, 4, 2)


def _set(key: str, value):
    def change(config):
        group, name = key.split(".")
        config[group][name] = value
    return change


def _retype(key: str, value):
    """Sets a value of another type than the default (ConfigDict itself refuses that)."""
    def change(config):
        group, name = key.split(".")
        config[group] = ml_collections.ConfigDict({**config[group].to_dict(), name: value})
    return change


def _delete(key: str):
    def change(config):
        group, name = key.split(".")
        del config[group][name]
    return change


def _update(**groups):
    def change(config):
        for group, values in groups.items():
            config[group].update(values)
    return change


BD3 = dict(process=dict(name="absorb"), loss=dict(kind="mdlm"))
GAMMA = dict(process=dict(name="gamma"), loss=dict(kind="dwdse"))
EPSILON = dict(process=dict(name="epsilon"), loss=dict(kind="hdce"))

# (case id, base file, change, regex the message must match: it names the key and value)
REJECTIONS = [
    ("missing_group", "base", lambda c: c.__delattr__("train"), r"train is missing"),
    ("missing_key", "base", _delete("train.seed"), r"train\.seed is missing"),
    ("heads_not_dividing", "base", _set("model.num_heads", 5), r"model\.num_heads=5 does not divide"),
    ("odd_head_dim", "base", _update(model=dict(d_model=36, num_heads=4)),
     r"model\.num_heads=4 gives an odd head dimension"),
    ("odd_frequency", "base", _set("model.frequency_embedding_size", 33),
     r"model\.frequency_embedding_size=33 must be even"),
    ("not_an_integer", "base", _retype("data.seq_len", 12.5), r"data\.seq_len=12\.5 must be an integer"),
    ("not_a_real", "base", _retype("train.b1", "0.9"), r"train\.b1='0\.9' must be a finite real"),
    ("layers_zero", "base", _set("model.num_layers", 0), r"model\.num_layers=0 must be >= 1"),
    ("dropout", "base", _set("model.dropout_rate", 1.0), r"model\.dropout_rate=1\.0 must lie in"),
    ("attention_impl", "base", _set("model.attention_impl", "flash"),
     r"model\.attention_impl='flash' is not one of"),
    ("cudnn_float32", "base", _update(model=dict(attention_impl="cudnn", dtype="float32")),
     r"model\.dtype='float32' must be bfloat16"),
    ("dtype", "base", _set("model.dtype", "int8"), r"model\.dtype='int8' is not one of"),
    ("param_dtype", "base", _set("model.param_dtype", "float16"), r"model\.param_dtype='float16'"),
    ("bool_field", "base", _retype("model.remat", 1), r"model\.remat=1 must be a bool"),
    ("query_chunk", "base", _set("model.attention_query_chunk", -3),
     r"model\.attention_query_chunk=-3 must be >= 1"),
    ("process_name", "base", _set("process.name", "gauss"), r"process\.name='gauss' is not one of"),
    ("loss_kind", "base", _set("loss.kind", "mse"), r"loss\.kind='mse' is not one of"),
    ("dwdse_with_epsilon", "base", _update(process=dict(name="epsilon"), loss=dict(kind="dwdse")),
     r"loss\.kind='dwdse' needs process\.name in .* got process\.name='epsilon'"),
    ("hdce_with_gamma", "base", _update(process=dict(name="gamma"), loss=dict(kind="hdce")),
     r"loss\.kind='hdce' needs process\.name"),
    ("gamma_zero", "base", _update(process=dict(name="gamma", gamma=0.0), loss=dict(kind="dwdse")),
     r"process\.gamma=0\.0 must lie in \(0\.0, 1\.0\)"),
    ("gamma_above_one", "base", _update(process=dict(name="gamma", gamma=1.5),
                                         loss=dict(kind="dwdse")),
     r"process\.gamma=1\.5 must lie in"),
    ("epsilon_one", "base", _update(process=dict(name="epsilon", epsilon=1.0),
                                     loss=dict(kind="hdce")),
     r"process\.epsilon=1\.0 must lie in"),
    ("lam_negative", "base", _update(process=dict(name="epsilon", lam=-1.0), loss=dict(kind="hdce")),
     r"process\.lam=-1\.0 must lie in"),
    ("weighted_embedding_absorb", "base", _set("model.weighted_embedding", True),
     r"model\.weighted_embedding=True needs process\.name='gamma'"),
    ("no_loss_term", "base", _update(loss=dict(beta1=0.0, beta2=0.0)),
     r"loss\.beta2=0\.0 and loss\.beta1=0\.0 leave no loss term"),
    ("beta_negative", "base", _set("loss.beta1", -1.0), r"loss\.beta1=-1\.0 must lie in"),
    ("schedule_name", "base", _set("schedule.name", "linear2"),
     r"schedule\.name='linear2' is not one of"),
    ("schedule_eta", "base", _set("schedule.eta", 1.0), r"schedule\.eta must be in \[0, 1\)"),
    ("schedule_sigma", "base", _update(schedule=dict(name="geometric", sigma_min=5.0,
                                                      sigma_max=1.0)),
     r"schedule\.sigma_min must be < sigma_max"),
    ("clip_order", "base", _update(**BD3, schedule=dict(clip_low=0.8, clip_high=0.3)),
     r"schedule\.clip_low=0\.8 must be < schedule\.clip_high=0\.3"),
    ("clip_range", "base", _set("schedule.clip_high", 1.2), r"schedule\.clip_high=1\.2 must lie in"),
    ("clip_without_mdlm", "base", _update(**GAMMA, schedule=dict(clip_low=0.3, clip_high=0.8)),
     r"schedule\.clip_low=0\.3 clips BD3-LM mask rates and needs loss\.kind='mdlm'"),
    ("clip_search_without_mdlm", "base", _update(**EPSILON, schedule=dict(clip_search=True)),
     r"schedule\.clip_search=True clips BD3-LM .* got loss\.kind='hdce'"),
    ("clip_grid_step", "base", _set("schedule.clip_grid_step", 0.0),
     r"schedule\.clip_grid_step=0\.0 must lie in"),
    ("clip_min_width", "base", _set("schedule.clip_min_width", 1.5),
     r"schedule\.clip_min_width=1\.5 must lie in"),
    ("hyperschedule_kind", "base", _set("hyperschedule.kind", "zigzag"),
     r"hyperschedule\.kind='zigzag' is not one of"),
    ("alignment", "base", _set("hyperschedule.alignment", "diagonal"),
     r"hyperschedule\.alignment='diagonal' is not one of"),
    ("num_levels", "base", _set("hyperschedule.num_levels", 0),
     r"hyperschedule\.num_levels=0 must be >= 1"),
    ("width_not_dividing", "base", _update(hyperschedule=dict(kind="block", width=5)),
     r"hyperschedule\.width=5 does not divide data\.seq_len=128"),
    ("width_too_large", "base", _update(hyperschedule=dict(kind="slide", width=256)),
     r"hyperschedule\.width=256 exceeds data\.seq_len=128"),
    ("width_zero", "base", _update(hyperschedule=dict(kind="block", width=0)),
     r"hyperschedule\.width=0 must be >= 1"),
    ("slide_intervals", "base", _update(hyperschedule=dict(kind="slide", num_intervals=200)),
     r"hyperschedule\.num_intervals=200 exceeds the 128 possible slide starts"),
    ("splash_slide", "base", _update(model=dict(attention_impl="splash"),
                                      hyperschedule=dict(kind="slide")),
     r"model\.attention_impl='splash' needs static masks"),
    ("ar_without_quench", "base", _set("loss.kind", "ar"),
     r"loss\.kind='ar' and hyperschedule\.kind='flat' do not match"),
    ("quench_without_ar", "base", _update(hyperschedule=dict(kind="quench", alignment="shifted")),
     r"loss\.kind='mdlm' and hyperschedule\.kind='quench' do not match"),
    ("quench_aligned", "lm1b_ar", _set("hyperschedule.alignment", "aligned"),
     r"hyperschedule\.alignment='aligned' must be 'shifted' with kind='quench'"),
    ("seq_len", "base", _set("data.seq_len", 1), r"data\.seq_len=1 must be >= 2"),
    ("framing_seq_len", "base", _update(data=dict(seq_len=2),
                                         hyperschedule=dict(kind="flat")),
     r"data\.seq_len=2 must be >= 3"),
    ("source", "base", _set("data.source", "wikipedia"), r"data\.source='wikipedia' is not one of"),
    ("openwebtext_path", "owt_gamma_flat", _set("data.path", ""),
     r"data\.path='' must name local files for data\.source='openwebtext'"),
    ("validation_fraction", "base", _set("data.validation_fraction", 0.0),
     r"data\.validation_fraction=0\.0 must lie in"),
    ("tokenizer", "base", _set("data.tokenizer", ""), r"data\.tokenizer='' must be a non-empty"),
    ("data_dir", "base", _set("data.data_dir", None), r"data\.data_dir=None must be a string"),
    ("num_steps", "base", _set("train.num_steps", 0), r"train\.num_steps=0 must be >= 1"),
    ("learning_rate", "base", _set("train.learning_rate", 0.0),
     r"train\.learning_rate=0\.0 must lie in"),
    ("decay", "base", _set("train.decay", "linear"), r"train\.decay='linear' is not one of"),
    ("accumulation", "base", _update(train=dict(num_steps=1001, grad_accum_steps=2)),
     r"train\.grad_accum_steps=2 does not divide train\.num_steps=1001"),
    ("warmup", "base", _update(train=dict(num_steps=1000, warmup_steps=1000, decay="cosine")),
     r"train\.warmup_steps=1000 must be below the 1000 optimizer updates"),
    ("b2", "base", _set("train.b2", 1.0), r"train\.b2=1\.0 must lie in"),
    ("eps", "base", _set("train.eps", 0.0), r"train\.eps=0\.0 must lie in"),
    ("ema", "base", _set("train.ema_decay", 1.0), r"train\.ema_decay=1\.0 must lie in"),
    ("log_every", "base", _set("train.log_every", 0), r"train\.log_every=0 must be >= 1"),
    ("async_checkpoint", "base", _retype("train.async_checkpoint", "yes"),
     r"train\.async_checkpoint='yes' must be a bool"),
    ("init_from", "base", _set("train.init_from", None), r"train\.init_from=None must be a string"),
    ("mesh_two_free", "base", _set("mesh.shape", (-1, -1, 1)),
     r"mesh\.shape=\(-1, -1, 1\) must hold positive sizes and at most one -1"),
    ("mesh_size", "base", _set("mesh.shape", (2, 2, 1)),
     r"mesh\.shape=\(2, 2, 1\) needs 4 devices, but there are 8"),
    ("mesh_not_dividing", "base", _set("mesh.shape", (-1, 3, 1)),
     r"mesh\.shape=\(-1, 3, 1\) does not divide the 8 devices"),
    ("mesh_rank", "base", _set("mesh.shape", (8, 1)), r"mesh\.shape=\(8, 1\) must be three"),
    ("batch_data_parallel", "base", _set("train.batch_size", 20),
     r"train\.batch_size=20 is not divisible by the data-parallel size data\*fsdp=8"),
    ("batch_processes", "base", _update(train=dict(batch_size=24), mesh=dict(shape=(-1, 1, 2))),
     r"train\.batch_size=24 is not divisible by the 16 processes"),
    ("tensor_heads", "base", _update(model=dict(num_heads=6, d_model=768),
                                      mesh=dict(shape=(2, 1, 4))),
     r"model\.num_heads=6 is not divisible by the tensor-parallel size 4"),
]


@pytest.mark.parametrize("case, name, change, message", REJECTIONS, ids=[r[0] for r in REJECTIONS])
def test_validate_rejects(case, name, change, message):
    config = load(name)
    change(config)
    num_processes = 16 if case == "batch_processes" else 1
    with pytest.raises(ValueError, match=message):
        config_lib.validate(config, num_devices=8, num_processes=num_processes)


def test_validate_needs_a_config_dict():
    with pytest.raises(ValueError, match="config must be an ml_collections.ConfigDict"):
        config_lib.validate({"model": {}}, num_devices=1, num_processes=1)

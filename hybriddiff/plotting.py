"""Figures for hyperschedules, attention masks, denoising trajectories and training curves.

Every function is pure: it draws into a new ``matplotlib.figure.Figure`` (or into the ``ax`` /
``fig`` it is given) and returns the figure, without touching pyplot's global state, so it works
headless (the Agg canvas renders PNGs) and in notebooks alike. ``save_png(fig, path)`` writes one.
A bare ``Figure`` is displayed inline by a notebook only under ``%matplotlib inline`` (the default
in Colab; a kernel started with ``MPLBACKEND=Agg`` shows it as text otherwise).

* ``plot_hyperschedule``: the heat map of seed 000 Fig. 2, generation step ``t`` (rows, top to
  bottom) by position ``i`` (columns), colour ``tau[t, i] / num_levels`` (= diffusion time u, red
  high, blue low), titled with the window width omega and the rate rho.
* ``plot_attention_mask``: a boolean attention mask (True = query row may attend to key column,
  DESIGN §3), optionally coloured by the kind of key (settled / clean inputs light, noisy inputs
  dark, as in seed 000 Fig. 7–10) and annotated with slot labels and spans.
* ``plot_training_layout``: the same for a ``masks.TrainingLayout``, with the clean half, the noisy
  windows and the padding labelled from the layout's own fields.
* ``plot_denoising_trajectory``: which tokens are masked, revealed or changed at every step of a
  sampler, and how many are revealed per step.
* ``plot_training_curves``: loss, validation bound and throughput against the step, read from the
  trainer's ``metrics.jsonl`` (the format is the contract documented on that function).
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from matplotlib.ticker import MaxNLocator

from hybriddiff.hyperschedules import Hyperschedule
from hybriddiff.masks import TrainingLayout

__all__ = [
    "CurvePanel",
    "DEFAULT_PANELS",
    "METRICS_FILE",
    "plot_attention_mask",
    "plot_denoising_trajectory",
    "plot_hyperschedule",
    "plot_training_curves",
    "plot_training_layout",
    "read_metrics_records",
    "save_png",
]

METRICS_FILE = "metrics.jsonl"
SPLITS = ("train", "valid")
KEY_KINDS = ("clean", "noisy", "pad")

# Categorical colours of mask cells: masked, allowed (no key kinds), allowed to a clean / settled
# key (light red), allowed to a noisy key (dark red), padding column (grey), as in seed 000 Fig. 7.
_MASK_COLORS = ("#ffffff", "#303030", "#f2a7a0", "#b2182b", "#d9d9d9")
_MASKED, _ALLOWED, _ALLOWED_CLEAN, _ALLOWED_NOISY, _PAD = range(5)
# Trajectory cells: masked, revealed before this step, revealed at this step, changed at this step
# without having been masked (uniform-noise corrections of the gamma / epsilon hybrids).
_TRAJECTORY_COLORS = ("#bdbdbd", "#fddc84", "#d95f02", "#1b9e77")
_TRAJECTORY_NAMES = ("masked", "revealed earlier", "revealed at this step", "changed at this step")
_MAX_TICKS = 64
_MAX_ANNOTATED_CELLS = 64 * 64


def _new_axes(ax: Axes | None, figsize: tuple[float, float]) -> Axes:
    if ax is not None:
        if not isinstance(ax, Axes):
            raise ValueError(f"ax must be a matplotlib Axes or None, got ax={ax!r}")
        return ax
    return Figure(figsize=figsize, layout="constrained").add_subplot()


def _figure_of(ax: Axes) -> Figure:
    return ax.get_figure(root=True)


def save_png(fig: Figure, path: str | os.PathLike[str], dpi: int = 100) -> Path:
    """Writes ``fig`` as a PNG at ``path`` (parent folders created) and returns the path.

    The image has ``figsize * dpi`` pixels (no tight bounding box), so its shape is predictable.
    """
    if not isinstance(fig, Figure):
        raise ValueError(f"fig must be a matplotlib Figure, got fig={fig!r}")
    if isinstance(dpi, bool) or not isinstance(dpi, numbers.Integral) or dpi < 1:
        raise ValueError(f"dpi must be a positive integer, got dpi={dpi!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=int(dpi))
    return path


# ----------------------------------------------------------------------------------------------
# Hyperschedules.


def plot_hyperschedule(
    hs: Hyperschedule, ax: Axes | None = None, *, title: str | None = None, cmap: str = "coolwarm"
) -> Figure:
    """Heat map of a hyperschedule (seed 000 Fig. 2).

    Rows are generation steps ``t = 0..T`` (top to bottom), columns positions ``i = 0..d-1``; the
    colour is ``tau[t, i] / num_levels``, the diffusion time of position ``i`` at step ``t``
    (``coolwarm``: red high noise, blue low, as in the paper). The title gives the window width
    omega (``hs.width``) and the rate rho (``hs.rate = d / T``), after ``title`` if given.
    """
    if not isinstance(hs, Hyperschedule):
        raise ValueError(f"hs must be a hyperschedules.Hyperschedule, got hs={hs!r}")
    ax = _new_axes(ax, (6.4, 4.8))
    u = hs.tau / hs.num_levels  # [T+1, d]
    image = ax.imshow(u, cmap=cmap, vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
    ax.set_xlabel("position i")
    ax.set_ylabel("generation step t")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    summary = f"ω = {hs.width}, ρ = {hs.rate:.3g} (d = {hs.length}, T = {hs.num_steps}, " \
              f"levels = {hs.num_levels})"
    ax.set_title(summary if title is None else f"{title}\n{summary}")
    colorbar = _figure_of(ax).colorbar(image, ax=ax)
    colorbar.set_label("noise level τ[t, i] / num_levels (time u)")
    return _figure_of(ax)


# ----------------------------------------------------------------------------------------------
# Attention masks.


def _as_bool_mask(mask: Any) -> np.ndarray:
    array = np.asarray(mask)
    if array.ndim != 2:
        raise ValueError(f"mask must be 2-D [queries, keys], got mask.shape={array.shape}")
    if array.size == 0:
        raise ValueError(f"mask must not be empty, got mask.shape={array.shape}")
    if array.dtype != np.bool_:
        if not (np.issubdtype(array.dtype, np.integer) and np.isin(array, (0, 1)).all()):
            raise ValueError(f"mask must hold booleans (or 0/1 integers), got dtype {array.dtype}")
        array = array.astype(bool)
    return array


def _key_codes(key_kinds: Sequence[str] | None, num_keys: int) -> np.ndarray | None:
    """Per-key code (_ALLOWED_CLEAN, _ALLOWED_NOISY or _PAD), or None without kinds."""
    if key_kinds is None:
        return None
    kinds = list(key_kinds)
    if len(kinds) != num_keys:
        raise ValueError(f"key_kinds must have one entry per key ({num_keys}), got {len(kinds)}")
    unknown = sorted({str(k) for k in kinds} - set(KEY_KINDS))
    if unknown:
        raise ValueError(f"key_kinds entries must be in {KEY_KINDS}, got {unknown}")
    codes = {"clean": _ALLOWED_CLEAN, "noisy": _ALLOWED_NOISY, "pad": _PAD}
    return np.array([codes[k] for k in kinds], dtype=np.int64)


def _mask_image(mask: np.ndarray, key_codes: np.ndarray | None) -> np.ndarray:
    """int [Q, K] categories of the mask cells (see _MASK_COLORS).

    With key kinds, masked cells of padding keys (and, for a square mask, of padding queries,
    since the slots are the same) are drawn as padding.
    """
    if key_codes is None:
        return np.where(mask, _ALLOWED, _MASKED)
    pad = np.broadcast_to((key_codes == _PAD)[None, :], mask.shape)  # [Q, K]
    if mask.shape[0] == mask.shape[1]:
        pad = pad | pad.T
    return np.where(mask, key_codes[None, :], np.where(pad, _PAD, _MASKED))


def _check_spans(spans: Sequence[tuple[int, int, str]], size: int) -> list[tuple[int, int, str]]:
    checked = []
    for span in spans:
        try:
            start, stop, name = span
        except (TypeError, ValueError):
            raise ValueError(f"spans entries must be (start, stop, name), got {span!r}") from None
        if not (isinstance(start, numbers.Integral) and isinstance(stop, numbers.Integral)
                and 0 <= start < stop <= size):
            raise ValueError(f"span {span!r} must satisfy 0 <= start < stop <= {size}")
        checked.append((int(start), int(stop), str(name)))
    return checked


def plot_attention_mask(
    mask: np.ndarray,
    ax: Axes | None = None,
    *,
    key_kinds: Sequence[str] | None = None,
    labels: Sequence[str] | None = None,
    spans: Sequence[tuple[int, int, str]] = (),
    dim_rows: Sequence[bool] | None = None,
    title: str | None = None,
) -> Figure:
    """Image of a 2-D boolean attention mask [queries, keys] (True = may attend, DESIGN §3).

    Args:
      mask: bool (or 0/1 integer) array [Q, K]; rows are queries (outputs), columns keys (inputs).
      ax: axes to draw into (a new figure if None).
      key_kinds: optional "clean" / "noisy" / "pad" per key: allowed cells are then coloured light
        red for clean (settled) keys and dark red for noisy keys, padding columns grey (seed 000
        Fig. 7–10); without it allowed cells are dark grey.
      labels: optional tick label per slot (square masks only; at most 64 slots are labelled).
      spans: ``(start, stop, name)`` slot ranges (square masks) drawn as separators and named on
        the top axis, e.g. the noisy and clean halves of the BD3-LM mask.
      dim_rows: optional bool per query; True rows (e.g. discarded outputs) get grey labels.
      title: axes title.
    """
    mask = _as_bool_mask(mask)
    num_queries, num_keys = mask.shape
    key_codes = _key_codes(key_kinds, num_keys)
    square = num_queries == num_keys
    if (labels is not None or spans) and not square:
        raise ValueError(f"labels and spans need a square mask, got mask.shape={mask.shape}")
    if labels is not None and len(labels) != num_keys:
        raise ValueError(f"labels must have one entry per slot ({num_keys}), got {len(labels)}")
    if dim_rows is not None and len(dim_rows) != num_queries:
        raise ValueError(
            f"dim_rows must have one entry per query ({num_queries}), got {len(dim_rows)}")
    checked_spans = _check_spans(spans, num_keys)

    side = float(np.clip(0.25 * max(num_queries, num_keys) + 1.5, 4.0, 10.0))
    ax = _new_axes(ax, (side + (2.5 if key_codes is not None else 0.0), side))
    image = _mask_image(mask, key_codes)
    ax.imshow(image, cmap=ListedColormap(_MASK_COLORS), vmin=-0.5, vmax=len(_MASK_COLORS) - 0.5,
              interpolation="nearest", aspect="equal")
    ax.set_xlabel("key (input slot)")
    ax.set_ylabel("query (output slot)")
    if labels is not None and num_keys <= _MAX_TICKS:
        ticks = np.arange(num_keys)
        ax.set_xticks(ticks, [str(s) for s in labels], rotation=90, fontsize=7)
        ax.set_yticks(ticks, [str(s) for s in labels], fontsize=7)
    if dim_rows is not None and labels is not None and num_keys <= _MAX_TICKS:
        for tick_label, dim in zip(ax.get_yticklabels(), dim_rows):
            if dim:
                tick_label.set_color("#9e9e9e")
    for start, stop, _ in checked_spans:
        for edge in (start, stop):
            if 0 < edge < num_keys:
                ax.axvline(edge - 0.5, color="#2166ac", linewidth=1.0)
                ax.axhline(edge - 0.5, color="#2166ac", linewidth=1.0)
    if checked_spans:
        top = ax.secondary_xaxis("top")
        top.set_xticks([(start + stop - 1) / 2 for start, stop, _ in checked_spans],
                       [name for _, _, name in checked_spans], fontsize=8)
        top.tick_params(length=0)
    if key_codes is not None:
        pad_present = {_PAD} if (key_codes == _PAD).any() else set()
        present = sorted(set(image[mask].tolist()) | pad_present)
        names = {_ALLOWED_CLEAN: "attends to clean / settled", _ALLOWED_NOISY: "attends to noisy",
                 _PAD: "padding"}
        ax.legend(handles=[Patch(color=_MASK_COLORS[c], label=names[c]) for c in present],
                  loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, frameon=False)
    allowed = int(mask.sum())
    summary = f"{num_queries}×{num_keys} mask, {allowed / mask.size:.1%} allowed"
    ax.set_title(summary if title is None else f"{title}\n{summary}")
    return _figure_of(ax)


def plot_training_layout(
    layout: TrainingLayout, ax: Axes | None = None, *, title: str | None = None
) -> Figure:
    """The attention mask of an efficient-training layout (seed 000 Fig. 7–10, seed 001 App. D).

    Slots are labelled from the layout's fields: clean slot of position p is ``x_p``, a window cell
    holding the noisy copy of position p is ``x̃_p`` (``x_p`` for the repeated settled token of
    SHIFTED windows), padding is ``·``. Keys are coloured clean (light) / noisy (dark) / padding,
    the clean half and every window are separated and named ``clean`` / ``w<i>:[start,end)``,
    and rows whose output is discarded (``target_position == -1``) have grey labels.
    """
    if not isinstance(layout, TrainingLayout):
        raise ValueError(f"layout must be a masks.TrainingLayout, got layout={layout!r}")
    input_index = np.asarray(layout.input_index)  # [S]
    positions = np.asarray(layout.positions)  # [S]
    is_pad = input_index < 0
    is_noisy = (input_index >= 0) & (input_index < layout.noisy_size)
    kinds = np.where(is_pad, "pad", np.where(is_noisy, "noisy", "clean"))
    labels = [
        "·" if pad else (rf"$\tilde{{x}}_{{{p}}}$" if noisy else rf"$x_{{{p}}}$")
        for pad, noisy, p in zip(is_pad, is_noisy, positions.tolist())
    ]
    spans = [(layout.clean_offset, layout.clean_offset + layout.length, "clean")]
    starts = np.asarray(layout.interval_start).tolist()
    ends = np.asarray(layout.interval_end).tolist()
    for i, (start, end) in enumerate(zip(starts, ends)):
        first = layout.window_offset + i * layout.window_slots
        spans.append((first, first + layout.window_slots, f"w{i}:[{start},{end})"))
    raw_slots = layout.length + layout.num_intervals * layout.window_slots
    if layout.num_slots > raw_slots:
        spans.append((raw_slots, layout.num_slots, "pad"))
    configuration = "SHIFTED" if layout.shifted else "ALIGNED"
    summary = (f"{layout.kind} layout, {configuration}, L = {layout.length}, "
               f"ω = {layout.width}, S = {layout.num_slots}")
    return plot_attention_mask(
        np.asarray(layout.mask), ax, key_kinds=kinds.tolist(), labels=labels,
        spans=sorted(spans), dim_rows=(np.asarray(layout.target_position) < 0).tolist(),
        title=summary if title is None else f"{title}: {summary}",
    )


# ----------------------------------------------------------------------------------------------
# Denoising trajectories.


def _trajectory_categories(states: np.ndarray, mask_id: int) -> np.ndarray:
    """int [T+1, d] categories (see _TRAJECTORY_NAMES); row 0 compares with nothing."""
    masked = states == mask_id  # [T+1, d]
    categories = np.where(masked, 0, 1)
    was_masked = np.concatenate([np.zeros_like(masked[:1]), masked[:-1]], axis=0)
    previous = np.concatenate([states[:1], states[:-1]], axis=0)
    categories = np.where(~masked & was_masked, 2, categories)
    return np.where(~masked & ~was_masked & (states != previous), 3, categories)


def plot_denoising_trajectory(
    states: np.ndarray,
    mask_id: int,
    *,
    token_text: Callable[[int], str] | None = None,
    title: str | None = None,
    fig: Figure | None = None,
) -> Figure:
    """Tokens revealed at every step of a sampler.

    Args:
      states: int array [num_steps + 1, length], the sequence after each step (row 0 = start).
      mask_id: the MASK id (N, DESIGN §1).
      token_text: optional decoder of one token id, used to write the tokens into the cells
        (at most 64 x 64 cells).
      title: figure title.
      fig: figure to draw into (a new one if None).

    Top: one row per step, cells masked / revealed earlier / revealed at this step / changed at
    this step without having been masked. Bottom: the number of positions revealed at each step
    (MASK -> token) and, on the right axis, the number unmasked after each step.
    """
    states = np.asarray(states)
    if states.ndim != 2:
        raise ValueError(
            f"states must be 2-D [num_steps + 1, length], got states.shape={states.shape}")
    if states.shape[0] < 1 or states.shape[1] < 1:
        raise ValueError(f"states must not be empty, got states.shape={states.shape}")
    if not np.issubdtype(states.dtype, np.integer):
        raise ValueError(f"states must hold integer token ids, got dtype {states.dtype}")
    if isinstance(mask_id, bool) or not isinstance(mask_id, numbers.Integral):
        raise ValueError(f"mask_id must be an integer, got mask_id={mask_id!r}")
    if token_text is not None and states.size > _MAX_ANNOTATED_CELLS:
        raise ValueError(
            f"token_text needs at most {_MAX_ANNOTATED_CELLS} cells, "
            f"got states.shape={states.shape}")
    if fig is None:
        fig = Figure(figsize=(8.0, 6.4), layout="constrained")
    elif not isinstance(fig, Figure):
        raise ValueError(f"fig must be a matplotlib Figure or None, got fig={fig!r}")

    categories = _trajectory_categories(states, int(mask_id))  # [T+1, d]
    image_ax, count_ax = fig.subplots(2, 1, height_ratios=(3, 1))
    image_ax.imshow(categories, cmap=ListedColormap(_TRAJECTORY_COLORS), vmin=-0.5, vmax=3.5,
                    aspect="auto", interpolation="nearest")
    image_ax.set_xlabel("position i")
    image_ax.set_ylabel("step t")
    image_ax.legend(handles=[Patch(color=c, label=n) for c, n in
                             zip(_TRAJECTORY_COLORS, _TRAJECTORY_NAMES)],
                    loc="upper center", bbox_to_anchor=(0.5, 1.12), ncols=4, fontsize=8,
                    frameon=False)
    if token_text is not None:
        for t, i in zip(*np.nonzero(states != mask_id)):
            image_ax.text(i, t, token_text(int(states[t, i])), ha="center", va="center",
                          fontsize=6, clip_on=True)

    unmasked = (states != mask_id).sum(axis=1)  # [T+1]
    revealed = (categories[1:] == 2).sum(axis=1)  # [T]
    steps = np.arange(1, states.shape[0])
    count_ax.plot(steps, revealed, marker=".", color=_TRAJECTORY_COLORS[2],
                  label="revealed at step t")
    count_ax.set_xlabel("step t")
    count_ax.set_ylabel("revealed")
    count_ax.set_xlim(0, max(states.shape[0] - 1, 1))
    total_ax = count_ax.twinx()
    total_ax.plot(np.arange(states.shape[0]), unmasked, color="#404040", linestyle="--",
                  label="unmasked after step t")
    total_ax.set_ylabel("unmasked")
    total_ax.set_ylim(0, states.shape[1] * 1.05)
    handles = count_ax.get_legend_handles_labels()[0] + total_ax.get_legend_handles_labels()[0]
    count_ax.legend(handles=handles, fontsize=8, loc="upper left")
    summary = f"{states.shape[0] - 1} steps, length {states.shape[1]}"
    fig.suptitle(summary if title is None else f"{title} ({summary})")
    return fig


# ----------------------------------------------------------------------------------------------
# Training curves.


@dataclasses.dataclass(frozen=True)
class CurvePanel:
    """One panel of ``plot_training_curves``: the metrics ``names`` of ``split`` against step."""

    split: str
    names: tuple[str, ...]
    ylabel: str


DEFAULT_PANELS = (
    CurvePanel("train", ("loss",), "training loss"),
    CurvePanel("valid", ("nll", "nll_ema"), "validation bound (nats/token)"),
    CurvePanel("train", ("tokens_per_s",), "tokens / s"),
)


def _check_record(record: Any, where: str) -> dict[str, Any]:
    if not isinstance(record, Mapping):
        raise ValueError(f"{where}: a metrics record must be a JSON object, got {record!r}")
    for key in ("step", "split"):
        if key not in record:
            raise ValueError(f"{where}: metrics record is missing key {key!r}: {dict(record)!r}")
    step, split = record["step"], record["split"]
    if isinstance(step, bool) or not isinstance(step, numbers.Integral) or step < 0:
        raise ValueError(f"{where}: 'step' must be a non-negative integer, got step={step!r}")
    if split not in SPLITS:
        raise ValueError(f"{where}: 'split' must be one of {SPLITS}, got split={split!r}")
    for name, value in record.items():
        if name in ("step", "split"):
            continue
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{where}: metric {name!r} must be a number, got {value!r}")
    return dict(record)


def read_metrics_records(
    workdir_or_records: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
) -> list[dict[str, Any]]:
    """Validated metrics records from a workdir, a ``.jsonl`` file or an iterable of dicts.

    See ``plot_training_curves`` for the format. Raises ValueError for a missing file, an empty
    file, a line that is not a JSON object, or a record without ``step`` / ``split`` or with a
    non-numeric metric (the message names the line).
    """
    if isinstance(workdir_or_records, (str, os.PathLike)):
        path = Path(workdir_or_records)
        if path.is_dir():
            path = path / METRICS_FILE
        if not path.is_file():
            raise ValueError(f"no metrics file at {str(path)!r}")
        records = []
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                parsed = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{where}: not valid JSON ({error.msg})") from None
            records.append(_check_record(parsed, where))
        source = str(path)
    else:
        records = [_check_record(r, f"record {n}") for n, r in enumerate(workdir_or_records)]
        source = "the given records"
    if not records:
        raise ValueError(f"no metrics records in {source}")
    return records


def _series(records: list[dict[str, Any]], split: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one metric sorted by step; a later record of the same step wins."""
    by_step = {r["step"]: float(r[name]) for r in records if r["split"] == split and name in r}
    steps = np.array(sorted(by_step), dtype=np.int64)
    return steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64)


def plot_training_curves(
    workdir_or_records: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    *,
    panels: Sequence[CurvePanel] = DEFAULT_PANELS,
    title: str | None = None,
    fig: Figure | None = None,
) -> Figure:
    """Training curves against the step, one panel per ``CurvePanel``.

    Input: a workdir (its ``metrics.jsonl`` is read), the path of a ``.jsonl`` file, or an
    iterable of records. Contract of ``metrics.jsonl`` (written by the trainer's process 0,
    alongside the TensorBoard events): one JSON object per line,
    ``{"step": int >= 0, "split": "train" | "valid", "<name>": float, ...}``; blank lines are
    ignored and, when a step appears twice for a split, the later record wins. The trainer writes
    ``loss``, ``grad_norm``, ``learning_rate``, ``tokens_per_s``, ... for ``train`` and the
    validation bound ``nll`` (nats/token), ``bits_per_token``, ``ppl`` (``*_ema`` for the EMA
    parameters) for ``valid``.

    The default panels show the training ``loss``, the validation bound ``nll`` (and ``nll_ema``
    when present) and the throughput ``tokens_per_s``. A panel whose metrics never appear says
    "no data"; ValueError when no panel has any data, or see ``read_metrics_records``.
    """
    records = read_metrics_records(workdir_or_records)
    panels = tuple(panels)
    if not panels or not all(isinstance(p, CurvePanel) for p in panels):
        raise ValueError(f"panels must be a non-empty sequence of CurvePanel, got {panels!r}")
    if all(_series(records, p.split, n)[0].size == 0 for p in panels for n in p.names):
        wanted = [f"{p.split}/{n}" for p in panels for n in p.names]
        raise ValueError(f"the metrics records hold none of the plotted metrics {wanted}")
    if fig is None:
        fig = Figure(figsize=(6.4, 2.4 * len(panels)), layout="constrained")
    elif not isinstance(fig, Figure):
        raise ValueError(f"fig must be a matplotlib Figure or None, got fig={fig!r}")
    axes = np.atleast_1d(fig.subplots(len(panels), 1, sharex=True))
    for ax, panel in zip(axes, panels):
        plotted = 0
        for name in panel.names:
            steps, values = _series(records, panel.split, name)
            if steps.size:
                ax.plot(steps, values, marker="." if steps.size < 50 else None,
                        label=f"{panel.split}/{name}")
                plotted += 1
        if plotted:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center")
        ax.set_ylabel(panel.ylabel)
        ax.grid(True, alpha=0.3)
    axes[-1].set_xlabel("step")
    last = max(r["step"] for r in records)
    summary = f"{len(records)} records, last step {last}"
    fig.suptitle(summary if title is None else f"{title} ({summary})")
    return fig

"""The Colab notebooks of `colab/` (issue 7): committed without outputs, written against the public
API only, and executed top to bottom on CPU with nbclient, with no error and images in the output.

The static checks read the notebooks as plain JSON. Executing them needs `nbclient`, `nbformat`
and `ipykernel` (the `test` extra); the kernel runs JAX on one CPU device, without the eight
virtual devices of `conftest.py`, and writes its temporary work directories under `tmp_path`.
"""

from __future__ import annotations

import ast
import base64
import io
import itertools
import json
import os
from pathlib import Path
from typing import Any

import nbclient
import nbformat
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
COLAB = REPO / "colab"
NOTEBOOKS = ("quickstart.ipynb", "hyperschedules.ipynb", "samplers.ipynb")
CELL_TIMEOUT_S = 600  # per cell; the whole notebook takes under a minute on 2 idle cores
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def read_json(name: str) -> dict[str, Any]:
    return json.loads((COLAB / name).read_text(encoding="utf-8"))


def source_of(cell: dict[str, Any]) -> str:
    source = cell["source"]
    return source if isinstance(source, str) else "".join(source)


def code_cells(notebook: Any) -> list[Any]:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def python_source(cell_source: str) -> str:
    """The cell without its IPython-only lines (`%magic`, `!shell`), which are not Python."""
    return "\n".join(line for line in cell_source.splitlines()
                     if not line.lstrip().startswith(("%", "!")))


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def private_uses(source: str) -> list[str]:
    """Underscored (non-dunder) module paths, imported names and attributes used in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names
                      if any(is_private(part) for part in alias.name.split("."))]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if any(is_private(part) for part in module.split(".")):
                found.append(module)
            found += [f"{module}.{alias.name}" for alias in node.names if is_private(alias.name)]
        elif isinstance(node, ast.Attribute) and is_private(node.attr):
            found.append(f".{node.attr}")
    return found


def imports_hybriddiff(source: str) -> bool:
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "hybriddiff"
                                                for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "hybriddiff":
            return True
    return False


# ----------------------------------------------------------------------------------------------
# Static checks (no kernel).


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_is_committed_without_outputs(name: str) -> None:
    notebook = read_json(name)
    assert notebook["nbformat"] == 4
    assert notebook["metadata"]["kernelspec"]["name"] == "python3"
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    cells = code_cells(notebook)
    assert cells, f"{name} has no code cell"
    for index, cell in enumerate(cells):
        assert cell["outputs"] == [], f"{name}: code cell {index} has stored outputs"
        assert cell["execution_count"] is None, f"{name}: code cell {index} has an execution count"
        assert "execution" not in cell.get("metadata", {}), f"{name}: code cell {index} has timings"


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_uses_only_public_hybriddiff_names(name: str) -> None:
    sources = [python_source(source_of(cell)) for cell in code_cells(read_json(name))]
    assert any(imports_hybriddiff(source) for source in sources), f"{name} never imports hybriddiff"
    used = [use for source in sources for use in private_uses(source)]
    assert used == [], f"{name} uses private names: {used}"


def test_private_name_check_flags_every_kind_of_private_use() -> None:
    source = ("import hybriddiff._checks\n"
              "from hybriddiff.sampling._validation import check\n"
              "from hybriddiff.masks import _causal_mask, causal_mask\n"
              "x = hs._settled_pair\n"
              "y = hybriddiff.__file__\n")
    assert private_uses(source) == ["hybriddiff._checks", "hybriddiff.sampling._validation",
                                    "hybriddiff.masks._causal_mask", "._settled_pair"]
    assert private_uses("from hybriddiff import masks\nmasks.causal_mask(3).__len__()") == []


def test_notebooks_share_one_setup_cell() -> None:
    """Every notebook opens with the same setup cell: install in Colab, find the checkout."""
    first = [source_of(code_cells(read_json(name))[0]) for name in NOTEBOOKS]
    assert all(source == first[0] for source in first), "the setup cells differ"
    for needle in ('"google.colab" in sys.modules', "https://github.com/hybriddiff/hybriddiff",
                   "HYBRIDDIFF_ROOT", "configs", "%matplotlib inline"):
        assert needle in first[0], f"the setup cell does not mention {needle!r}"


# ----------------------------------------------------------------------------------------------
# Execution.


def kernel_env(tmp_path: Path) -> dict[str, str]:
    """The test process's environment for the kernel: the checkout, Agg, JAX on one CPU device,
    temporary files and IPython's profile under `tmp_path`."""
    env = dict(os.environ)
    flags = [flag for flag in env.get("XLA_FLAGS", "").split()
             if not flag.startswith(DEVICE_COUNT_FLAG)]
    env.pop("XLA_FLAGS", None)
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    for name in ("tmp", "ipython"):
        (tmp_path / name).mkdir()
    env.update(HYBRIDDIFF_ROOT=str(REPO), MPLBACKEND="Agg", JAX_PLATFORMS="cpu",
               TMPDIR=str(tmp_path / "tmp"), IPYTHONDIR=str(tmp_path / "ipython"))
    return env


def outputs_of(cells: list[Any]) -> list[Any]:
    return [output for cell in cells for output in cell["outputs"]]


def images_of(cells: list[Any]) -> list[np.ndarray]:
    """The `image/png` outputs of `cells`, decoded to pixel arrays."""
    from matplotlib import image

    return [image.imread(io.BytesIO(base64.b64decode(output["data"]["image/png"])), format="png")
            for output in outputs_of(cells)
            if output["output_type"] in ("display_data", "execute_result")
            and "image/png" in output["data"]]


def stdout_of(cells: list[Any]) -> str:
    return "".join(output["text"] for output in outputs_of(cells)
                   if output["output_type"] == "stream" and output["name"] == "stdout")


def tagged(notebook: Any, tag: str) -> list[Any]:
    cells = [cell for cell in code_cells(notebook) if tag in cell["metadata"].get("tags", [])]
    assert cells, f"no cell is tagged {tag!r}"
    return cells


@pytest.mark.slow
@pytest.mark.parametrize("name", NOTEBOOKS)
def test_notebook_executes_without_error(name: str, tmp_path: Path) -> None:
    notebook = nbformat.read(COLAB / name, as_version=4)
    work = tmp_path / "cwd"
    work.mkdir()
    client = nbclient.NotebookClient(
        notebook, timeout=CELL_TIMEOUT_S, startup_timeout=180, kernel_name="python3",
        resources={"metadata": {"path": str(work)}},
        extra_arguments=["--HistoryManager.enabled=False"])
    client.execute(env=kernel_env(tmp_path))  # raises CellExecutionError at the first error

    cells = code_cells(notebook)
    errors = [f"{output['ename']}: {output['evalue']}" for output in outputs_of(cells)
              if output["output_type"] == "error"]
    assert errors == []
    assert all(cell["execution_count"] is not None for cell in cells), "a cell did not run"
    assert images_of(cells), f"{name} displayed no image/png output"
    assert list(work.iterdir()) == [], "the notebook wrote into its working directory"

    if name == "hyperschedules.ipynb":
        heat_maps = images_of(tagged(notebook, "heatmaps"))
        assert len(heat_maps) >= 5, f"expected a heat map per hyperschedule, got {len(heat_maps)}"
        for (i, a), (j, b) in itertools.combinations(enumerate(heat_maps), 2):
            assert a.shape != b.shape or not np.array_equal(a, b), f"heat maps {i} and {j} agree"
    if name == "samplers.ipynb":
        from hybriddiff.sampling.unmasking import ADAPTIVE_STRATEGIES, COUNT_STRATEGIES

        table = stdout_of(tagged(notebook, "sampler-table"))
        rows = {line.split()[0] for line in table.splitlines() if line.strip()}
        assert {"ancestral", "acs"} <= rows, table
        assert rows & set(COUNT_STRATEGIES + ADAPTIVE_STRATEGIES), table

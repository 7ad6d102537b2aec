"""Sphinx configuration for the xattn documentation.

Build (warnings are errors, as in CI)::

    python -m sphinx -W --keep-going -b html docs docs/_build/html
    python -m sphinx -W --keep-going -b doctest docs docs/_build/doctest

The API reference is generated from ``xattn.__all__`` (and ``xattn.testing.__all__``) each
time the docs build, so a function added to the package appears without editing any page.
"""

from __future__ import annotations

import ast
import inspect
import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # the checkout's xattn, also without `pip install -e`
os.environ.setdefault("MPLBACKEND", "Agg")

import xattn  # noqa: E402
import xattn.testing  # noqa: E402

project = "xattn"
author = "the xattn developers"
copyright = "2026, the xattn developers"
version = release = xattn.__version__

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.autosummary",
    "sphinx.ext.doctest",
    "sphinx.ext.mathjax",
    "numpydoc",
    "matplotlib.sphinxext.plot_directive",
]

exclude_patterns = ["_build", "**.ipynb_checkpoints"]
templates_path: list[str] = []
html_static_path = ["_static"] if (HERE / "_static").is_dir() else []

html_theme = "pydata_sphinx_theme"
html_title = f"xattn {release}"
html_theme_options = {
    "show_toc_level": 2,
    "header_links_before_dropdown": 9,
    "navigation_with_keys": False,
    "secondary_sidebar_items": ["page-toc"],
}
html_show_sourcelink = False

# autodoc / numpydoc: the docstrings carry the types; class members are listed by autodoc.
autodoc_typehints = "none"
autodoc_member_order = "bysource"
autosummary_generate = False  # the stubs are written below, from __all__
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# Docstring examples run under pytest --doctest-modules (with its NUMBER option); the pages run
# their own `.. doctest::` / `.. testcode::` blocks here, so plain >>> blocks are not collected
# twice.
doctest_test_doctest_blocks = ""
doctest_global_setup = """
import numpy as np
import xattn
np.set_printoptions(precision=4, suppress=True)
"""

# Pictures made by `.. plot::` at build time (sparse masks, error curves).
plot_include_source = True
plot_html_show_source_link = False
plot_html_show_formats = False
plot_formats = [("png", 100)]
plot_pre_code = "import numpy as np\nimport matplotlib.pyplot as plt\nimport xattn"

# ---------------------------------------------------------------------------------------------
# API reference: one stub page per public name, grouped by the module that defines it.

SECTIONS = {
    "xattn.standard": "Exact attention",
    "xattn.flash": "Exact attention",
    "xattn.sparse": "Sparse attention",
    "xattn._blockmask": "Sparse attention",
    "xattn.flex": "Programmable attention (score_mod, mask_mod)",
    "xattn.linear": "Linear attention",
    "xattn.positional": "Positions: RoPE and ALiBi",
    "xattn.kvcache": "Inference",
}
OTHER = "Other"


def _write(path: Path, text: str) -> None:
    # Rewrite only on change, so incremental builds stay incremental.
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def _stub(module: str, name: str, obj) -> str:
    full = f"{module}.{name}"
    if inspect.isclass(obj):
        body = f".. autoclass:: {name}\n   :members:\n   :special-members: __and__, __or__\n"
    elif callable(obj):
        body = f".. autofunction:: {name}\n"
    else:
        body = f".. autodata:: {name}\n"
    return f"{full}\n{'=' * len(full)}\n\n.. currentmodule:: {module}\n\n{body}"


def _summary(module: str, names: list[str]) -> str:
    lines = [f".. currentmodule:: {module}", "", ".. autosummary::", "   :nosignatures:", ""]
    lines += [f"   {n}" for n in names]
    lines += ["", ".. toctree::", "   :hidden:", ""]
    lines += [f"   generated/{module}.{n}" for n in names]
    return "\n".join(lines) + "\n\n"


def write_api_pages() -> None:
    out = HERE / "generated"
    out.mkdir(exist_ok=True)
    wanted = set()

    groups: dict[str, list[str]] = {}
    for name in sorted(xattn.__all__, key=str.lower):
        obj = getattr(xattn, name)
        groups.setdefault(SECTIONS.get(getattr(obj, "__module__", ""), OTHER), []).append(name)
    order = list(dict.fromkeys([*SECTIONS.values(), OTHER]))
    text = []
    for title in order:
        if title not in groups:
            continue
        text += [title, "-" * len(title), "", _summary("xattn", groups[title])]
    text += ["Testing helpers: ``xattn.testing``", "-" * 35, "",
             ".. automodule:: xattn.testing", "   :no-members:", "",
             _summary("xattn.testing", sorted(xattn.testing.__all__, key=str.lower))]
    _write(out / "api_sections.inc", "\n".join(text))

    for module, names in (("xattn", xattn.__all__), ("xattn.testing", xattn.testing.__all__)):
        mod = sys.modules[module]
        for name in names:
            path = out / f"{module}.{name}.rst"
            wanted.add(path.name)
            _write(path, _stub(module, name, getattr(mod, name)))
    for stale in out.glob("*.rst"):
        if stale.name not in wanted:  # a removed name would be an orphan page (a warning)
            stale.unlink()


def _first_paragraph(path: Path) -> str:
    if path.suffix == ".py":
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    else:  # a shell script: its leading comment block, after the shebang
        lines = []
        for line in path.read_text().splitlines()[1:]:
            if not line.startswith("#"):
                break
            lines.append(line.lstrip("#").strip())
        doc = "\n".join(lines)
    return " ".join(doc.split("\n\n")[0].split())


def write_comparison_scripts() -> None:
    """The list of benchmarks/ scripts with the first paragraph of each one's docstring."""
    items = []
    for path in sorted((HERE.parent / "benchmarks").glob("*")):
        if path.suffix in (".py", ".sh") and not path.name.startswith("_"):
            text = _first_paragraph(path) or "(no description)"
            # Plain text from a docstring: escape what reST would read as markup.
            for ch in "\\*`|_[":
                text = text.replace(ch, "\\" + ch)
            items.append(f"* ``benchmarks/{path.name}`` -- {text}")
    if not items:
        items = ["No comparison script yet."]
    (HERE / "generated").mkdir(exist_ok=True)
    _write(HERE / "generated" / "comparison_scripts.inc", "\n".join(items) + "\n")


write_api_pages()
write_comparison_scripts()

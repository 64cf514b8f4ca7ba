"""rslib: the library behind the CRS-Diff and CC-Diff reproduction notebooks."""

import warnings

with warnings.catch_warnings():
    # In a notebook, tqdm.auto warns once at import: "IProgress not found. Please update jupyter and ipywidgets"
    # without ipywidgets, and "Using tqdm.autonotebook.tqdm in notebook mode" with them. Its text bars show fine in
    # Jupyter, so import it here, quietly, before rslib, diffusers or transformers do.
    warnings.simplefilter("ignore")
    import tqdm.auto  # noqa: F401

__version__ = "0.1.0"

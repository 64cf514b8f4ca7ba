"""rslib: the library behind the CRS-Diff and CC-Diff reproduction notebooks."""

import warnings

with warnings.catch_warnings():
    # In a notebook, tqdm.auto warns once at import: "IProgress not found. Please update jupyter and ipywidgets"
    # without ipywidgets, and "Using tqdm.autonotebook.tqdm in notebook mode" with them. Its text bars show fine in
    # Jupyter, so import it here, quietly, before rslib, diffusers or transformers do.
    warnings.simplefilter("ignore")
    import tqdm.auto  # noqa: F401

__version__ = "0.1.0"

# The pipelines and their loaders at package level (``rslib.CRSDiffPipeline``), imported on first use so that
# ``import rslib.config`` stays light.
_PIPELINE_NAMES = ("CCDiffPipeline", "CRSDiffPipeline", "load_cc_diff", "load_crs_diff", "load_stage_one")


def __getattr__(name: str) -> object:
    """The pipelines and loaders of :mod:`rslib.pipelines`, imported on first use."""
    if name in _PIPELINE_NAMES:
        import rslib.pipelines

        return getattr(rslib.pipelines, name)
    raise AttributeError(f"module 'rslib' has no attribute {name!r}")

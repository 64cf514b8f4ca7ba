"""The diffusers pipelines of the library and their loaders: stage one (a plain ``StableDiffusionPipeline``),
CRS-Diff and CC-Diff."""
from rslib.pipelines.cc_diff import CCDiffPipeline, load_cc_diff, sample_cc_diff
from rslib.pipelines.crs_diff import CRSDiffPipeline, load_crs_diff, sample_crs_diff
from rslib.pipelines.stage_one import load_stage_one, sample_stage_one

__all__ = ["CCDiffPipeline", "CRSDiffPipeline", "load_cc_diff", "load_crs_diff", "load_stage_one", "sample_cc_diff",
           "sample_crs_diff", "sample_stage_one"]

"""Data layer: SynthRS, the record format and readers of real data sets, condition maps, torch datasets."""

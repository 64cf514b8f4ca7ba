"""Published tables load with their sources; ours sit beside them in separate, labelled columns."""
import pandas as pd
import pytest

from rslib.eval.tables import load_results, ours_table, paper_table, save_results, side_by_side, write_table


def test_published_tables_carry_sources():
    for name in ("cc_diff_main", "cc_diff_trainability", "crs_diff_rsicd"):
        df = paper_table(name)
        assert len(df) and "source" in df and df["source"].notna().all()
    head = paper_table("cc_diff_main", version="readme-head-c35c625")
    row = head[(head.dataset == "DIOR-RSVG") & (head.method == "CC-Diff")].iloc[0]
    assert row.fid == pytest.approx(70.68) and row.map50 == pytest.approx(56.59)
    with pytest.raises(FileNotFoundError, match="published tables"):
        paper_table("nope")


def test_side_by_side_keeps_ours_and_published_apart(tmp_path):
    ours = ours_table([{"method": "CC-Diff", "fid": 40.0, "map50": 12.0}], preset="cpu")
    paper = paper_table("cc_diff_main", version="readme-head-c35c625")
    paper = paper[paper.dataset == "DIOR-RSVG"]
    table = side_by_side(ours, paper, ["fid", "map50"], paper_label="paper (DIOR-RSVG)")
    row = table[table.method == "CC-Diff"].iloc[0]
    assert row["ours: fid"] == 40.0 and row["paper (DIOR-RSVG): fid"] == pytest.approx(70.68)
    assert pd.isna(table[table.method == "MIGC"].iloc[0]["ours: fid"])  # no invented numbers
    # ours first, in our order, then the paper's other methods in its order
    ours2 = ours_table([{"method": "z ours", "fid": 1.0}, {"method": "CC-Diff", "fid": 40.0}], preset="cpu")
    rows = list(side_by_side(ours2, paper, ["fid"]).method)
    others = [m for m in paper.method.drop_duplicates() if m != "CC-Diff"]
    assert rows == ["z ours", "CC-Diff", *others]
    md, csv = write_table(table, tmp_path, "t", caption="caption")
    assert md.read_text().startswith("caption") and pd.read_csv(csv).shape == table.shape


def test_results_round_trip(tmp_path):
    p = save_results({"fid": 1.5, "n": 3}, tmp_path / "a" / "eval.json")
    assert load_results(p) == {"fid": 1.5, "n": 3} and load_results(tmp_path / "missing.json") == {}

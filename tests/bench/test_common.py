"""The committed results files: a benchmark's rerun replaces its table and keeps what a person
wrote below the marker."""

from __future__ import annotations

from bench import common


def test_a_rerun_replaces_the_table_and_keeps_the_hand_written_sections(tmp_path, monkeypatch):
    committed, device_out = tmp_path / "results", tmp_path / "device"
    committed.mkdir()
    monkeypatch.setattr(common, "RESULTS", committed)
    history = f"{common.KEPT_MARKER}\n\n## Why the rule is 64 rows\n\nmeasured once.\n"
    (committed / "gemm.md").write_text(f"# GEMMs\n\n| old table |\n\n{history}")
    path = common.write_results("gemm", "GEMMs", "| new table |", notes="ratios to bf16",
                                directory=device_out)
    text = path.read_text()
    assert path == device_out / "gemm.md"
    assert "| new table |" in text and "| old table |" not in text
    assert text.index("ratios to bf16") < text.index(common.KEPT_MARKER)
    assert text.endswith(history)
    # A file without the marker is replaced whole.
    (committed / "other.md").write_text("# other\n\n| old |\n")
    assert "| old |" not in common.write_results("other", "other", "| new |").read_text()

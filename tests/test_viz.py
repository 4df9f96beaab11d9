"""Markdown the chapters display: tables whose cells hold `|`, and headings moved under a page's title."""

import pytest

import qlab as ql


def test_markdown_table_escapes_pipes_and_checks_widths():
    text = ql.viz.markdown_table(["layer", "max |x|"], [["fc1", "6.3"], ["a|b", 2]])
    assert text.splitlines() == ["| layer | max \\|x\\| |", "|---|---|", "| fc1 | 6.3 |", "| a\\|b | 2 |"]
    with pytest.raises(ValueError, match="row 1 has 1 cells, the header 2"):
        ql.viz.markdown_table(["a", "b"], [[1, 2], [3]])
    with pytest.raises(ValueError, match="at least one column"):
        ql.viz.markdown_table([], [])


def test_show_markdown_moves_headings(capsys):
    ql.viz.show_markdown("# Card\n\ntext\n\n## Training\n#not a heading", top_level=3)
    assert capsys.readouterr().out.splitlines() == ["### Card", "", "text", "", "#### Training", "#not a heading"]

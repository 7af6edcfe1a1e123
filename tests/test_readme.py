"""The README documents what the code does: every TensorBoard tag, every MonitorConfig field."""

from dataclasses import fields
from pathlib import Path

from memwatch import AlertConfig, MonitorConfig
from memwatch.reporters.tensorboard import tag_table

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_tag_table_is_current():
    block = README.split("<!-- tags:begin -->\n", 1)[1].split("\n<!-- tags:end -->", 1)[0]
    assert block.strip() == tag_table().strip()


def _first_cells(heading: str) -> str:
    """The first cells of the table right under `heading` (a field documented there, not merely mentioned)."""
    section = README.split(f"\n{heading}\n", 1)[1]
    rows = []
    for line in section.split("\n| field |", 1)[1].splitlines()[2:]:
        if not line.startswith("|"):
            break
        rows.append(line.split("|")[1])
    return "\n".join(rows)


def test_every_config_field_has_a_row_in_its_table():
    for cls, heading in ((MonitorConfig, "### MonitorConfig"), (AlertConfig, "### AlertConfig")):
        cells = _first_cells(heading)
        missing = [f.name for f in fields(cls) if f"`{f.name}`" not in cells]
        assert not missing, (cls.__name__, missing)


def test_readme_opens_with_the_two_commands():
    head = README.split("## ", 1)[0]
    blocks = head.split("```bash\n")[1:]
    first, cpu = (b.split("\n```", 1)[0] for b in blocks[:2])
    # One command each: the default (CUDA) build, and a CPU-only machine's from PyTorch's CPU wheel index.
    assert "\n" not in first and first.endswith('pip install ".[ngrams]" && memwatch demo')
    assert "\n" not in cpu and "--index-url https://download.pytorch.org/whl/cpu && " in cpu
    assert cpu.endswith('pip install ".[ngrams]" && memwatch demo')
    # CI repeats that install from a fresh clone (torch's CPU build from local disk there).
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert 'git clone -q . "$fresh/memwatch"' in ci and 'pip install -q ".[ngrams]"' in ci
    assert '<!-- ci:test -->\n```bash\npip install -e ".[test]" && pytest' in head
